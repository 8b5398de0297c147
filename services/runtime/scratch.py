"""Temporary folders that do not outlive their process.

A service's request folders (`cmrvl-pre-*`, `cmrvl-seg-*`, `cmrvl-upload-*`) live inside one
folder owned by the process, `<tmp>/cmrvl-proc-<pid>-<random>/`. Each request removes its own
folder in a finally; the process folder goes at exit (after a graceful SIGTERM drain, once the
requests have finished). A process that was killed cannot clean up: its folder stays, and the
next service process that starts on the machine (or pod volume) removes it. The owner holds an
flock on its folder for its lifetime, so a live folder is never taken for a dead one (a pid can
be reused; a lock dies with its process)."""

from __future__ import annotations

import atexit
import fcntl
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

log = logging.getLogger("cmrvl.scratch")

ROOT_PREFIX = "cmrvl-proc-"
# A folder is created a moment before its owner locks it: never sweep one that young.
MIN_AGE_S = 10.0

_lock = threading.Lock()
_root: Path | None = None
_root_fd: int | None = None


def sweep(parent: Path | None = None) -> list[Path]:
    """Remove the process folders of processes that are gone; returns what was removed."""
    parent = Path(parent or tempfile.gettempdir())
    removed = []
    for folder in parent.glob(ROOT_PREFIX + "*"):
        if folder == _root or not folder.is_dir() or time.time() - folder.stat().st_mtime < MIN_AGE_S:
            continue
        try:
            fd = os.open(folder, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # its process is alive
        else:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        finally:
            os.close(fd)
    if removed:
        log.info("removed %d temporary folders of stopped processes", len(removed))
    return removed


def process_root() -> Path:
    """This process's folder (created, locked and the dead ones swept on first use)."""
    global _root, _root_fd
    with _lock:
        if _root is None:
            root = Path(tempfile.mkdtemp(prefix=f"{ROOT_PREFIX}{os.getpid()}-"))
            fd = os.open(root, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _root, _root_fd = root, fd
            atexit.register(_remove_root)
            sweep(root.parent)
        return _root


def _remove_root() -> None:
    global _root, _root_fd
    with _lock:
        if _root is not None:
            shutil.rmtree(_root, ignore_errors=True)
            os.close(_root_fd)
            _root = _root_fd = None


def scratch_dir(prefix: str) -> tempfile.TemporaryDirectory:
    """A request's temporary folder (a context manager: removed when the block ends, error or not)."""
    return tempfile.TemporaryDirectory(prefix=prefix, dir=process_root(), ignore_cleanup_errors=True)


def mkdtemp(prefix: str) -> Path:
    """A temporary folder the caller removes in its own finally."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=process_root()))
