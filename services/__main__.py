"""`python -m services` is the `cmrvl` command (used where the console script is not on PATH)."""

import sys

from services.cli import main

sys.exit(main())
