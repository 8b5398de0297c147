"""A real Orthanc PACS for tests: started on loopback with a temporary configuration.

    with OrthancServer(tmp_path / "orthanc", modalities={"cmrvl": ("CMRVL", "127.0.0.1", port)}) as pacs:
        pacs.upload(files)                               # POST /instances
        pacs.post("/modalities/cmrvl/store", {...})      # Orthanc pushes by C-STORE

Everything of its own (storage, index, log) lives in the given folder; its HTTP and DICOM ports
are picked free on 127.0.0.1. Orthanc 1.10 (Debian) has no bind-address option and listens on
every interface, so it is started with a small LD_PRELOAD library (built here once with the C
compiler, cached outside the checkout) that turns its wildcard binds into loopback binds; on top
of that RemoteAccessAllowed is false and only the listed modalities may C-STORE or C-ECHO.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from model_cache import CACHE_ROOT

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
AE_TITLE = "ORTHANC"

# bind() to INADDR_ANY / in6addr_any becomes a bind to the loopback address of that family.
_LOOPBACK_BIND_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    static int (*real_bind)(int, const struct sockaddr *, socklen_t);
    if (!real_bind) real_bind = (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "bind");
    if (addr && addr->sa_family == AF_INET && len >= sizeof(struct sockaddr_in)) {
        struct sockaddr_in in4;
        memcpy(&in4, addr, sizeof in4);
        if (in4.sin_addr.s_addr == htonl(INADDR_ANY)) {
            in4.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
            return real_bind(fd, (const struct sockaddr *)&in4, sizeof in4);
        }
    }
    if (addr && addr->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6)) {
        struct sockaddr_in6 in6;
        memcpy(&in6, addr, sizeof in6);
        if (!memcmp(&in6.sin6_addr, &in6addr_any, sizeof in6addr_any)) {
            in6.sin6_addr = in6addr_loopback;
            return real_bind(fd, (const struct sockaddr *)&in6, sizeof in6);
        }
    }
    return real_bind(fd, addr, len);
}
"""


class OrthancError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def loopback_bind_library() -> Path:
    """The LD_PRELOAD library, compiled once per source text into the test cache."""
    import hashlib

    digest = hashlib.sha256(_LOOPBACK_BIND_C.encode()).hexdigest()[:12]
    library = CACHE_ROOT / f"loopback-bind-{digest}.so"
    if library.exists():
        return library
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OrthancError("no C compiler (cc) to build the loopback-bind library Orthanc is started with")
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    source = library.with_suffix(".c")
    source.write_text(_LOOPBACK_BIND_C)
    partial = library.with_suffix(f".{os.getpid()}.part")
    subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", str(partial), str(source), "-ldl"],
                   check=True, capture_output=True)
    partial.replace(library)
    return library


class OrthancServer:
    def __init__(self, folder: Path, modalities: dict[str, tuple[str, str, int]] | None = None,
                 ae_title: str = AE_TITLE):
        self.folder = Path(folder)
        self.ae_title = ae_title
        self.modalities = dict(modalities or {})
        self.http_port = self.dicom_port = 0
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout_s: float = 30.0) -> OrthancServer:
        if not Path(ORTHANC).exists():
            raise OrthancError(f"Orthanc not installed ({ORTHANC}); run infra/tools/install-dicom-tools.sh")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.http_port, self.dicom_port = free_port(), free_port()
        config = {
            "Name": "cmrvl-test-pacs",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.ae_title,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": True,
            # Only the listed modalities, from their own address, may store or echo.
            "DicomAlwaysAllowEcho": False,
            "DicomAlwaysAllowStore": False,
            "DicomCheckModalityHost": True,
            "DicomModalities": {name: {"AET": aet, "Host": host, "Port": port}
                                for name, (aet, host, port) in self.modalities.items()},
            "Plugins": [],
            "HttpsVerifyPeers": False,
        }
        config_file = self.folder / "orthanc.json"
        config_file.write_text(json.dumps(config, indent=2))
        env = {**os.environ, "LD_PRELOAD": str(loopback_bind_library())}
        self._log = open(self.folder / "orthanc.log", "ab")
        self.process = subprocess.Popen([ORTHANC, str(config_file)], stdout=self._log, stderr=subprocess.STDOUT,
                                        env=env, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise OrthancError(f"Orthanc exited with {self.process.returncode}: {self.log_tail()}")
            try:
                self.get("/system")
                return self
            except (OSError, OrthancError):
                time.sleep(0.2)
        self.stop()
        raise OrthancError(f"Orthanc's REST API did not answer within {timeout_s:.0f} s: {self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
            self._log.close()

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, chars: int = 2000) -> str:
        log = self.folder / "orthanc.log"
        return log.read_text(errors="replace")[-chars:] if log.exists() else ""

    # -- REST ------------------------------------------------------------------------------------
    def request(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json",
                timeout_s: float = 120.0):
        request = urllib.request.Request(self.url + path, data=body, method=method,
                                         headers={"Content-Type": content_type} if body is not None else {})
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                data = response.read()
        except urllib.error.HTTPError as exc:
            raise OrthancError(f"{method} {path}: HTTP {exc.code}: {exc.read()[:500]!r}") from None
        return json.loads(data) if data else None

    def get(self, path: str):
        return self.request("GET", path)

    def post(self, path: str, payload, timeout_s: float = 120.0):
        return self.request("POST", path, json.dumps(payload).encode(), timeout_s=timeout_s)

    def upload(self, files) -> list[dict]:
        """POST /instances for each file; returns Orthanc's answers (ID, ParentStudy, Status...)."""
        answers = []
        for path in files:
            answer = self.request("POST", "/instances", Path(path).read_bytes(), "application/dicom")
            if answer.get("Status") not in ("Success", "AlreadyStored"):
                raise OrthancError(f"Orthanc did not store {path}: {answer}")
            answers.append(answer)
        return answers

    def study_instances(self, orthanc_study_id: str) -> list[dict]:
        """Every instance of a study with its main DICOM tags (SOPClassUID, Modality, ...)."""
        instances = []
        for series in self.get(f"/studies/{orthanc_study_id}/series"):
            for instance in self.get(f"/series/{series['ID']}/instances"):
                tags = self.get(f"/instances/{instance['ID']}/simplified-tags")
                instances.append({"ID": instance["ID"], "Modality": series["MainDicomTags"].get("Modality", ""),
                                  **tags})
        return instances
