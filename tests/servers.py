"""A server subprocess for tests: started on port 0 with a database, stopped for sure."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

SERVE = [str(Path(sys.executable).parent / "session-manager"), "serve"]


class ServerProcess:
    def __init__(self, process: subprocess.Popen[str], port: int) -> None:
        self.process = process
        self.port = port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @classmethod
    def start(
        cls, database: Path, *args: str, env: Mapping[str, str] | None = None
    ) -> ServerProcess:
        stderr = tempfile.TemporaryFile()  # noqa: SIM115 - read only if the start fails
        process = subprocess.Popen(
            [*SERVE, "--address=127.0.0.1:0", f"--database={database}", "--log-level=error", *args],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env={**os.environ, **(env or {})},
        )
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.startswith("session-manager listening on port"):
            process.wait(15)
            stderr.seek(0)
            raise AssertionError(f"the server did not start: {stderr.read().decode()}")
        return cls(process, int(line.rsplit(" ", 1)[1]))

    def wait(self, timeout: float = 10.0) -> int:
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(15)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(15)
