"""The chart's workflow-database commands against a real Postgres (apt `postgresql`): the
rendered probes tell a running server from a stopped one, the gateway's URL (after the kubelet's
$(PGPASSWORD) expansion) logs in with the generated credential, and the preStop command stops the
server. The port is the test's own loopback port, never 5432 (other tests may run a server there).
"""

from __future__ import annotations

import base64
import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "infra" / "tools"))
import chart_testlib as lib  # noqa: E402


def _pg_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if not found:
        pytest.skip(f"{name} not installed (apt postgresql)")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def chart():
    """The StatefulSet's container, the gateway's env and the generated Secret's password."""
    docs = lib.rendered("default")
    container = lib.one(docs, "StatefulSet", "cmrvl-workflow-db")["spec"]["template"]["spec"]["containers"][0]
    gateway = lib.one(docs, "Deployment", "cmrvl-gateway")["spec"]["template"]["spec"]["containers"][0]
    secret = lib.one(docs, "Secret", "cmrvl-workflow-db")
    return {
        "env": {e["name"]: e.get("value") for e in container["env"]},
        "container": container,
        "gateway": {e["name"]: e for e in gateway["env"]},
        "password": base64.b64decode(secret["data"]["password"]).decode(),
    }


@pytest.fixture
def server(chart):
    """A Postgres data folder made as the image's entrypoint makes it (role, password file,
    scram-sha-256 for TCP), owned by a non-root user; yields a runner and the paths."""
    for tool in ("initdb", "pg_ctl", "pg_isready", "psql"):
        _pg_bin(tool)
    root_run = os.geteuid() == 0
    as_user = ["runuser", "-u", "nobody", "--"] if root_run else []
    work = Path(tempfile.mkdtemp(prefix="cmrvl-pg-", dir="/tmp"))
    pgdata, sockets = work / "pgdata", work / "run"
    sockets.mkdir()
    password_file = work / "password"
    password_file.write_text(chart["password"])
    if root_run:
        nobody = pwd.getpwnam("nobody")
        for p in (work, sockets, password_file):
            os.chown(p, nobody.pw_uid, nobody.pw_gid)
    env = chart["env"]
    port = _free_port()

    def run(*cmd, check=True):
        return subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=60, check=check,
                              env={**os.environ, "PGHOST": "", "PGPASSWORD": ""})

    run(_pg_bin("initdb"), f"--pgdata={pgdata}", f"--username={env['POSTGRES_USER']}", f"--pwfile={password_file}",
        "--auth-local=trust", "--auth-host=scram-sha-256")
    options = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={sockets}"
    run(_pg_bin("pg_ctl"), "start", f"--pgdata={pgdata}", "--wait", f"--options={options}", f"--log={work / 'log'}")
    run(_pg_bin("psql"), f"--host={sockets}", f"--port={port}", f"--username={env['POSTGRES_USER']}", "--dbname=postgres",
        "--command", f"CREATE DATABASE {env['POSTGRES_DB']}")

    def local(command: list[str]) -> list[str]:
        """A rendered command with this test's port and data folder."""
        out = [f"--port={port}" if a.startswith("--port=") else a for a in command]
        out = [f"--pgdata={pgdata}" if a.startswith("--pgdata=") else a for a in out]
        return [_pg_bin(out[0]), *out[1:]]

    yield {"run": run, "local": local, "port": port, "pgdata": pgdata}
    run(_pg_bin("pg_ctl"), "stop", f"--pgdata={pgdata}", "--mode=immediate", check=False)
    shutil.rmtree(work, ignore_errors=True)


def test_probes_url_and_prestop_work_against_postgres(chart, server):
    c = chart["container"]
    ready = server["local"](c["readinessProbe"]["exec"]["command"])
    assert server["run"](*ready, check=False).returncode == 0
    assert server["local"](c["startupProbe"]["exec"]["command"]) == ready

    # The gateway's URL, expanded as the kubelet does, logs in over TCP with the Secret's password.
    gw = chart["gateway"]
    url = gw["CMRVL_WORKFLOW_DATABASE_URL"]["value"].replace("$(PGPASSWORD)", chart["password"])
    host = url.split("@", 1)[1].split("/", 1)[0]
    url = url.replace(host, f"127.0.0.1:{server['port']}")
    who = server["run"](_pg_bin("psql"), url, "--tuples-only", "--no-align", "--command",
                        "SELECT current_user || '/' || current_database()")
    assert who.stdout.strip() == f"{chart['env']['POSTGRES_USER']}/{chart['env']['POSTGRES_DB']}"
    wrong = server["run"](_pg_bin("psql"), url.replace(chart["password"], "not-it"), "--command", "SELECT 1", check=False)
    assert wrong.returncode != 0 and "password authentication failed" in wrong.stderr

    # preStop stops the server (fast: open sessions do not hold it), and readiness then fails.
    session = subprocess.Popen([*(["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []),
                                _pg_bin("psql"), url, "--command", "SELECT pg_sleep(60)"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while server["run"](_pg_bin("psql"), url, "--tuples-only", "--no-align", "--command",
                            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%'").stdout.strip() != "1":
            assert time.monotonic() < deadline, "the long session did not start"
            time.sleep(0.2)
        stop = server["local"](c["lifecycle"]["preStop"]["exec"]["command"])
        assert server["run"](*stop, check=False).returncode == 0
        assert not (server["pgdata"] / "postmaster.pid").exists()
        assert session.wait(timeout=30) != 0  # its session was ended, not waited for
    finally:
        session.kill()
    assert server["run"](*ready, check=False).returncode != 0
