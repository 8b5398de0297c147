#!/usr/bin/env bash
# PostgreSQL server binaries (Debian package `postgresql`) for the tests of the gateway's
# workflow database: the tests start a throwaway cluster with initdb/pg_ctl on 127.0.0.1 (the
# package's own service is not used). Idempotent; needs root (CI runs as root).
set -euo pipefail
ls /usr/lib/postgresql/*/bin/initdb > /dev/null 2>&1 && { echo "PostgreSQL present"; exit 0; }
if [ "$(id -u)" != 0 ]; then
  echo "install-postgres.sh: PostgreSQL missing; run as root or apt-get install postgresql" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -q --no-install-recommends postgresql
