"""Start `luodi serve` as a real subprocess on a free loopback port, wait until it is ready, stop it by pid."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `luodi serve` subprocess; ``url`` is host:port (tritonclient's form), ``base`` the http:// form."""

    def __init__(
        self, repository: Path, *args: str, log: Path, env: dict[str, str] | None = None, tls: bool = False
    ) -> None:
        self.port = free_port()
        self.url = f"127.0.0.1:{self.port}"
        self.base = f"{'https' if tls else 'http'}://{self.url}"
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115  (closed in stop())
        cmd = [sys.executable, "-m", "luodi", "serve", "--repository", str(repository), "--port", str(self.port)]
        self.proc = subprocess.Popen([*cmd, *args], stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base}/v2/health/ready", timeout=2, verify=False).status_code == 200:
                    return
            time.sleep(0.1)
        raise AssertionError(f"the server was not ready within {timeout_s} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def events(self) -> list[str]:
        """The ``event`` of each JSON line of the server's log, in order (lines without one are left out)."""
        return log_events(self.log())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self._log.close()


def log_events(text: str) -> list[str]:
    """The ``event`` field of each JSON line in ``text`` (other lines, and lines without one, are left out)."""
    found = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            doc = json.loads(line)
            if isinstance(doc, dict) and "event" in doc:
                found.append(doc["event"])
    return found


@contextlib.contextmanager
def running(repository: Path, *args: str, log: Path) -> Iterator[Server]:
    server = Server(repository, *args, log=log)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
