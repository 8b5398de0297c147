"""A throwaway PostgreSQL cluster on 127.0.0.1 (initdb + pg_ctl of the Debian `postgresql`
package; infra/tools/install-postgres.sh), for the gateway's workflow database in tests."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest


def postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresCluster:
    def __init__(self, root: Path, port: int, password: str):
        self.root, self.port, self.password = root, port, password

    def url(self, database: str) -> str:
        return f"postgresql://cmrvl:{self.password}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database's URL (one per test: no state shared between tests)."""
        import psycopg

        name = "wf_" + secrets.token_hex(4)
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)


@contextlib.contextmanager
def postgres_cluster():
    """Start a cluster (initdb as the `postgres` user when run as root: initdb refuses root),
    yield it, stop it and remove its files."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL server binaries missing in CI (infra/tools/install-postgres.sh)")
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not installed: run infra/tools/install-postgres.sh")
    root = Path(tempfile.mkdtemp(prefix="cmrvl-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    password = secrets.token_urlsafe(12)
    (root / "pw").write_text(password)
    if run_as:
        os.chown(root / "pw", pwd.getpwnam("postgres").pw_uid, -1)
    data, port = root / "data", _free_port()
    subprocess.run([*run_as, str(bin_dir / "initdb"), "-D", str(data), "-U", "cmrvl", "--pwfile", str(root / "pw"),
                    "-A", "scram-sha-256", "--no-sync"], check=True, capture_output=True)
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off -c max_connections=200"
    subprocess.run([*run_as, str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"),
                    "-w", "-t", "60", "start"], check=True, capture_output=True)
    try:
        yield PostgresCluster(root, port, password)
    finally:
        subprocess.run([*run_as, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
