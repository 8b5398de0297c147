"""The local stack: the whole system on one machine as real processes.

`cmrvl up` starts a SeaweedFS S3 server (`weed mini`, the embedded stand-in for MinIO) and the
four gRPC services; `cmrvl down` stops them. State (ports, pids, generated credentials, data,
logs) lives in one folder, `~/.cmrvl/stack` unless CMRVL_STACK_DIR says otherwise.

Ports are offsets from one base (default 50050), so several stacks (tests, a developer's) can run
side by side: gateway base+1, preprocess +2, segmentation +3, findings +4, metrics +11..+14,
S3 +20, and SeaweedFS's internal ports +21..+39.

A stage can run as several replicas (`cmrvl up --replicas segmentation=2`), as its Deployment
does in the cluster: the first keeps the stage's ports, the others take +5..+9 (metrics +15..+19)
in order, and the gateway gets every replica's address in one target
(`ipv4:127.0.0.1:P1,127.0.0.1:P2`), over which its channel spreads the calls round robin.
More gateway replicas (`start_gateway_replica`, on the same object store and workflow database)
take the free ports of +5..+9 that stage replicas leave."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

STAGES = ("preprocess", "segmentation", "findings", "gateway")  # start order: gateway last
GRPC_OFFSETS = {"gateway": 1, "preprocess": 2, "segmentation": 3, "findings": 4}
METRICS_OFFSET = 10  # a process's Prometheus port: its gRPC port + 10
EXTRA_REPLICA_OFFSETS = (5, 6, 7, 8, 9)  # gRPC ports of the stages' second and further replicas
# `up` replicates the stages; more gateways of a stack: start_gateway_replica.
REPLICATED = ("preprocess", "segmentation", "findings")
S3_OFFSET = 20
DEFAULT_BASE = 50050
HIGHEST_OFFSET = 24 + 10000  # weed mini's admin gRPC port
MAX_BASE = 65535 - HIGHEST_OFFSET


def default_stack_dir() -> Path:
    return Path(os.environ.get("CMRVL_STACK_DIR") or Path.home() / ".cmrvl" / "stack")


@dataclass
class StackInfo:
    base_port: int
    access_key: str
    secret_key: str
    ris_token: str
    internal_token: str
    pids: dict[str, int] = field(default_factory=dict)
    extra_env: dict[str, str] = field(default_factory=dict)  # CMRVL_* overrides for every service
    replicas: dict[str, int] = field(default_factory=dict)  # stage -> processes, where more than 1

    @property
    def s3_endpoint(self) -> str:
        return f"127.0.0.1:{self.base_port + S3_OFFSET}"

    def replica_names(self, service: str) -> list[str]:
        """The processes of one service: `segmentation`, then `segmentation-2`, ..."""
        return [service] + [f"{service}-{n}" for n in range(2, self.replicas.get(service, 1) + 1)]

    def processes(self) -> list[str]:
        """Every service process of this stack, in start order (gateway last)."""
        return [name for service in STAGES for name in self.replica_names(service)]

    def grpc_port(self, name: str) -> int:
        """The gRPC port of one process (`segmentation`, `segmentation-2`)."""
        if name in GRPC_OFFSETS:
            return self.base_port + GRPC_OFFSETS[name]
        extra = [n for n in self.processes() if n not in GRPC_OFFSETS]
        if name not in extra:
            raise KeyError(f"no process {name!r} in this stack")
        return self.base_port + EXTRA_REPLICA_OFFSETS[extra.index(name)]

    def metrics_port(self, name: str) -> int:
        return self.grpc_port(name) + METRICS_OFFSET

    def address(self, name: str) -> str:
        """host:port of one process."""
        return f"127.0.0.1:{self.grpc_port(name)}"

    def target(self, service: str) -> str:
        """The gRPC target of a service: all its replicas' addresses (clients spread over them)."""
        ports = [self.grpc_port(name) for name in self.replica_names(service)]
        if len(ports) == 1:
            return f"127.0.0.1:{ports[0]}"
        return "ipv4:" + ",".join(f"127.0.0.1:{port}" for port in ports)

    def service_env(self, name: str) -> dict[str, str]:
        """The CMRVL_* environment one service process of this stack runs with."""
        env = {
            "CMRVL_GRPC_HOST": "127.0.0.1",
            "CMRVL_GRPC_PORT": str(self.grpc_port(name)),
            "CMRVL_METRICS_PORT": str(self.metrics_port(name)),
            "CMRVL_S3_ENDPOINT": self.s3_endpoint,
            "CMRVL_S3_ACCESS_KEY": self.access_key,
            "CMRVL_S3_SECRET_KEY": self.secret_key,
            "CMRVL_INTERNAL_TOKEN": self.internal_token,
            "CMRVL_PREPROCESS_TARGET": self.target("preprocess"),
            "CMRVL_SEGMENTATION_TARGET": self.target("segmentation"),
            "CMRVL_FINDINGS_TARGET": self.target("findings"),
        }
        if name == "gateway":
            env["CMRVL_AUTH_TOKENS"] = self.ris_token
            env["CMRVL_GATEWAY_REPLICA"] = name  # stable over restarts, as a pod name is
            from services.runtime.settings import Settings

            for service, count in self.replicas.items():  # the calls all of a stage's replicas can run
                per_process = Settings.model_fields[f"{service}_concurrency"].default
                env[f"CMRVL_{service.upper()}_CONCURRENCY"] = str(per_process * count)
        return env


def service_of(name: str) -> str:
    """The service a process runs: `segmentation-2` -> `segmentation`."""
    base, _, number = name.rpartition("-")
    return base if number.isdigit() and base in GRPC_OFFSETS else name


def check_replicas(replicas: dict[str, int]) -> dict[str, int]:
    """The replica counts `up` can start (only those above 1 kept), or ValueError saying why."""
    for service, count in replicas.items():
        if service not in REPLICATED:
            raise ValueError(f"cannot run replicas of {service!r}: only {', '.join(REPLICATED)} can "
                             "(the local stack runs one gateway)")
        if not isinstance(count, int) or count < 1:
            raise ValueError(f"replicas of {service} must be a whole number of at least 1, not {count!r}")
    extra = sum(count - 1 for count in replicas.values())
    if extra > len(EXTRA_REPLICA_OFFSETS):
        raise ValueError(f"{extra} replicas beyond the first of each stage asked for; the stack's port "
                         f"range has room for {len(EXTRA_REPLICA_OFFSETS)}")
    return {service: count for service, count in replicas.items() if count > 1}


def _weed_command(info: StackInfo, data_dir: Path, s3_config: Path) -> list[str]:
    b = info.base_port
    weed = Path(sys.executable).with_name("weed")
    # Every port and the bind address are passed explicitly on every start: weed's defaults
    # bind other ports, derive gRPC ports as port+10000 and report telemetry.
    return [
        str(weed if weed.exists() else shutil.which("weed") or "weed"), "mini",
        f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-master.telemetry=false", f"-s3.config={s3_config}", "-s3.iam=false",
        "-admin.ui=false", "-webdav=false",
        f"-s3.port={b + 20}", f"-master.port={b + 21}", f"-volume.port={b + 22}", f"-filer.port={b + 23}",
        f"-admin.port={b + 24}", f"-s3.port.iceberg={b + 25}", f"-s3.port.lance={b + 26}",
        f"-s3.port.grpc={b + 30}", f"-master.port.grpc={b + 31}", f"-volume.port.grpc={b + 32}",
        f"-filer.port.grpc={b + 33}",
        # weed mini's worker dials the admin gRPC port at admin.port + 10000 whatever is set.
        f"-admin.port.grpc={b + 24 + 10000}",
    ]


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _terminate(pid: int, sig: int, timeout_s: float) -> None:
    """Send `sig`, wait for the process to go, SIGKILL it after `timeout_s`."""
    if not _alive(pid):
        return
    os.kill(pid, sig)
    deadline = time.monotonic() + timeout_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)


def _ports(base: int) -> list[int]:
    return [base + offset for offset in range(40)] + [base + HIGHEST_OFFSET]


def check_base_port(base: int) -> None:
    if not 1024 <= base <= MAX_BASE:
        raise ValueError(f"base port {base} out of range: the stack uses base .. base+{HIGHEST_OFFSET}, "
                         f"so the base must be between 1024 and {MAX_BASE}")


def _port_bindable(port: int) -> bool:
    """Nobody listens on it and no connection holds it as its local port (a connect test alone
    misses the second: a client's port blocks a later bind with 'Address already in use')."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return not _port_open(port)


def _ephemeral_low() -> int:
    """Lowest port the kernel hands to outgoing connections (Linux: ip_local_port_range)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_base_port() -> int:
    """A base port whose whole range (base .. base+39, base+HIGHEST_OFFSET) is free now.

    Chosen below the kernel's ephemeral range where it fits, so that the stack's ports are not
    taken meanwhile by some client's outgoing connection (seen in CI: a stage failed to bind)."""
    low, top = 10000, min(MAX_BASE, _ephemeral_low() - HIGHEST_OFFSET - 1)
    if top - low < 50 * 50:  # too little room below the ephemeral range: use the whole range
        low, top = 20000, MAX_BASE
    for _ in range(200):
        base = low + secrets.randbelow((top - low) // 50) * 50
        if all(_port_bindable(port) for port in _ports(base)):
            return base
    raise RuntimeError("no free port range found")


class Stack:
    def __init__(self, stack_dir: Path | None = None):
        self.dir = Path(stack_dir or default_stack_dir())
        self.info_file = self.dir / "stack.json"

    def info(self) -> StackInfo | None:
        if not self.info_file.exists():
            return None
        try:
            return StackInfo(**json.loads(self.info_file.read_text()))
        except (ValueError, TypeError) as exc:
            raise RuntimeError(f"{self.info_file} is not a stack's state ({exc}); "
                               "remove it or choose another --stack-dir") from None

    def running(self) -> bool:
        info = self.info()
        # More gateway replicas (start_gateway_replica) may run beside the stack's own processes.
        return bool(info and {"s3", *info.processes()} <= set(info.pids) and all(_alive(p) for p in info.pids.values()))

    def up(self, base_port: int = DEFAULT_BASE, timeout_s: float = 90.0, extra_env: dict | None = None,
           replicas: dict[str, int] | None = None) -> StackInfo:
        """Start the stack, each stage as `replicas[stage]` processes (default 1); a stack already
        running is returned as it is, and one that is partly running (a process died or was
        stopped) gets what is missing started again."""
        wanted = None if replicas is None else check_replicas(replicas)
        previous = self.info()
        if previous and any(_alive(p) for p in previous.pids.values()):
            if wanted is not None and wanted != previous.replicas:
                now = ",".join(f"{k}={v}" for k, v in previous.replicas.items())
                now = f"with --replicas {now}" if now else "with one process per stage"
                raise RuntimeError(f"the stack in {self.dir} is running {now}; run `cmrvl down` first to change that")
            return previous if self.running() else self._restart_missing(previous, timeout_s)
        check_base_port(base_port)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "logs").mkdir(exist_ok=True)
        # Credentials are generated once per stack folder and kept (the data stays readable).
        info = StackInfo(
            base_port=base_port,
            access_key=previous.access_key if previous else "cmrvl-" + secrets.token_hex(6),
            secret_key=previous.secret_key if previous else secrets.token_urlsafe(24),
            ris_token=previous.ris_token if previous else secrets.token_urlsafe(24),
            internal_token=previous.internal_token if previous else secrets.token_urlsafe(24),
            extra_env=dict(extra_env or {}),
            replicas=wanted or {},
        )
        busy = [port for port in _ports(info.base_port) if _port_open(port)]
        if busy:
            raise RuntimeError(f"ports already in use: {busy[:5]} (choose another --base-port)")
        s3_config = self.dir / "s3.json"
        s3_config.write_text(json.dumps({"identities": [{
            "name": "cmrvl",
            "credentials": [{"accessKey": info.access_key, "secretKey": info.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        s3_config.chmod(0o600)
        self._write(info)
        try:
            info.pids["s3"] = self._spawn("s3", _weed_command(info, self.dir / "s3-data", s3_config), {})
            self._write(info)
            self._wait_port(info, "s3", info.base_port + S3_OFFSET, timeout_s)
            self._ensure_buckets(info, timeout_s)
            for name in info.processes():
                self._spawn_service(info, name)
            for name in info.processes():
                self._wait_healthy(info, name, timeout_s)
        except BaseException:
            self.down()
            raise
        return info

    def _restart_missing(self, info: StackInfo, timeout_s: float) -> StackInfo:
        """Start again the processes of a partly running stack that are gone, on its own ports."""
        info.pids = {name: pid for name, pid in info.pids.items() if _alive(pid)}
        self._write(info)
        if "s3" not in info.pids:
            port = info.base_port + S3_OFFSET
            if _port_open(port):
                raise RuntimeError(f"the stack's S3 port {port} is taken by another process")
            info.pids["s3"] = self._spawn("s3", _weed_command(info, self.dir / "s3-data", self.dir / "s3.json"), {})
            self._write(info)
            self._wait_port(info, "s3", port, timeout_s)
            self._ensure_buckets(info, timeout_s)
        missing = [name for name in info.processes() if name not in info.pids]
        for name in missing:
            port = info.grpc_port(name)
            if _port_open(port):
                raise RuntimeError(f"the stack's {name} port {port} is taken by another process")
            self._spawn_service(info, name)
        for name in missing:
            self._wait_healthy(info, name, timeout_s)
        return info

    def start_service(self, name: str, timeout_s: float = 60.0) -> None:
        """(Re)start one service process of a running stack (`segmentation`, `segmentation-2`),
        e.g. after `stop_service`."""
        info = self.info()
        self._spawn_service(info, name)
        self._wait_healthy(info, name, timeout_s)

    def stop_service(self, name: str, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> None:
        """Stop one process (a service replica or `s3`): SIGTERM drains gracefully, SIGKILL
        simulates a crash."""
        info = self.info()
        pid = info.pids.pop(name)
        _terminate(pid, sig, timeout_s)
        self._write(info)

    def _spawn_service(self, info: StackInfo, name: str, env: dict | None = None, key: str = "") -> None:
        """Start process `name` (`segmentation-2`: a replica); `key` names it in the pids instead."""
        env = {**info.service_env(name), **info.extra_env, **(env or {})}
        if service_of(name) == "gateway":  # its workflow database (SQLite unless extra_env names one) goes with the stack
            env.setdefault("CMRVL_STATE_DIR", str(self.dir / "gateway"))
        command = [sys.executable, "-m", "services", "serve", service_of(name)]
        info.pids[key or name] = self._spawn(key or name, command, env)
        self._write(info)

    def start_gateway_replica(self, name: str, timeout_s: float = 60.0) -> str:
        """One more gateway process of a running stack, replica `name` on the same object store and
        workflow database, on the next free port of base+5..+9 (metrics off); returns its target.
        `down` stops it; `stop_service(f"gateway@{name}")` kills it."""
        info = self.info()
        port = next((p for p in range(info.base_port + 5, info.base_port + 10) if _port_bindable(p)), None)
        if port is None:
            raise RuntimeError("no free port for another gateway replica (base+5..+9)")
        key = f"gateway@{name}"
        self._spawn_service(info, "gateway", {"CMRVL_GRPC_PORT": str(port), "CMRVL_METRICS_PORT": "0",
                                              "CMRVL_GATEWAY_REPLICA": name}, key)
        self._wait_healthy(info, key, timeout_s, target=f"127.0.0.1:{port}")
        return f"127.0.0.1:{port}"

    def down(self, timeout_s: float = 30.0) -> None:
        info = self.info()
        if info is None:
            return
        # Gateway first, so no new work reaches the stages; S3 last.
        order = sorted(info.pids, key=lambda name: (name.partition("@")[0] != "gateway", name == "s3"))
        for name in order:
            _terminate(info.pids[name], signal.SIGTERM, timeout_s)
        info.pids = {}
        self._write(info)

    def _write(self, info: StackInfo) -> None:
        self.info_file.write_text(json.dumps(asdict(info), indent=2))
        self.info_file.chmod(0o600)

    def _spawn(self, name: str, command: list[str], env: dict[str, str]) -> int:
        log = open(self.dir / "logs" / f"{name}.log", "ab")
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **env}, start_new_session=True,
        )
        # Reap the child when it exits so `_alive` sees it go.
        threading.Thread(target=process.wait, daemon=True).start()
        return process.pid

    def _wait_port(self, info: StackInfo, name: str, port: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not _port_open(port):
            if not _alive(info.pids[name]):
                raise RuntimeError(f"{name} exited during start-up; see {self.dir / 'logs' / (name + '.log')}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} did not open port {port} within {timeout_s:.0f}s")
            time.sleep(0.2)

    def _ensure_buckets(self, info: StackInfo, timeout_s: float) -> None:
        from services.runtime.settings import Settings
        from services.runtime.storage import ObjectStore

        store = ObjectStore(Settings(s3_endpoint=info.s3_endpoint, s3_access_key=info.access_key,
                                     s3_secret_key=info.secret_key))
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                store.ensure_buckets()
                # An object written and read back: the S3 port opens before the filer and the
                # volume server behind it serve (they answer 500s until then).
                bucket = store.bucket("artifacts")
                store.put_bytes(bucket, ".stack-probe", b"ok")
                store.get_bytes(bucket, ".stack-probe")
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def _wait_healthy(self, info: StackInfo, name: str, timeout_s: float, target: str = "") -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(target or info.address(name)) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if not _alive(info.pids[name]):
                    raise RuntimeError(f"{name} exited during start-up; see {self.dir / 'logs' / (name + '.log')}")
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} not healthy within {timeout_s:.0f}s")
                time.sleep(0.2)
