"""``session-manager serve`` as a real subprocess, for tests that need a process of its own.

``ServerProcess.start`` runs the server on port 0 (quiet: errors only, unless
told otherwise) with the given database and
returns once it printed "session-manager listening on port N", or fails the
test with the server's stderr if it exits or stays silent past the timeout.
Its stderr goes to a file (a pipe nobody reads would fill and stall it).
``failed_start`` runs a server that must refuse to start and returns what it said.
"""

from __future__ import annotations

import os
import re
import resource
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

SERVER = str(Path(sys.executable).parent / "session-manager")
_LISTENING = re.compile(r"session-manager listening on port (\d+)\n")


def command(database: Path | str, *args: str, quiet: bool = True) -> list[str]:
    """The command line of a server on ``database``.

    Port 0, and with ``quiet`` ``--log-level=error``, unless ``args`` name an address or a level.
    """
    defaults = {"--address": "--address=127.0.0.1:0"}
    if quiet:
        defaults["--log-level"] = "--log-level=error"
    named = {arg.split("=", 1)[0] for arg in args}
    chosen = [value for flag, value in defaults.items() if flag not in named]
    return [SERVER, "serve", *chosen, f"--database={database}", *args]


def _environment(env: Mapping[str, str] | None) -> dict[str, str]:
    return {**os.environ, **(env or {})}


class ServerProcess:
    """A running server subprocess; a context manager that stops it on exit."""

    def __init__(self, process: subprocess.Popen[str], port: int, stderr: IO[str]) -> None:
        self.process = process
        self.port = port
        self._stderr = stderr

    @classmethod
    def start(
        cls,
        database: Path | str,
        *args: str,
        env: Mapping[str, str] | None = None,
        timeout: float = 30.0,
        file_limit: tuple[int, int] | None = None,
    ) -> ServerProcess:
        """Start a server; ``file_limit`` is its (soft, hard) limit of open files."""
        stderr = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed by close()
        process = subprocess.Popen(
            command(database, *args),
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=_environment(env),
            preexec_fn=None if file_limit is None else _limit_files(file_limit),
        )
        try:
            port = _wait_for_port(process, timeout)
        except (TimeoutError, EOFError) as error:
            if process.poll() is None:
                process.kill()
            process.wait(10)
            stderr.seek(0)
            said = stderr.read()
            stderr.close()
            raise AssertionError(f"the server did not start ({error}): {said[-2000:]}") from None
        return cls(process, port, stderr)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def stderr(self) -> str:
        """What the server wrote on stderr so far."""
        self._stderr.flush()
        self._stderr.seek(0)
        return self._stderr.read()

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float = 30.0) -> int:
        return self.process.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait for the exit status (0 after a clean shutdown)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: the server gets no chance to clean up."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)

    def close(self) -> None:
        try:
            self.stop()
        except subprocess.TimeoutExpired:
            self.kill()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._stderr.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _limit_files(limit: tuple[int, int]) -> Callable[[], None]:
    def limit_files() -> None:  # runs in the child, before the server starts
        resource.setrlimit(resource.RLIMIT_NOFILE, limit)

    return limit_files


def _wait_for_port(process: subprocess.Popen[str], timeout: float) -> int:
    """The port of the "listening" line, read within ``timeout`` seconds."""
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not selector.select(left):
                raise TimeoutError(f"no listening line within {timeout} s")
            line = process.stdout.readline()
            if not line:
                raise EOFError(f"the server exited with {process.wait(10)}")
            match = _LISTENING.fullmatch(line)
            if match:
                return int(match.group(1))


@dataclass(frozen=True)
class Refusal:
    """What a server that refused to start did: its exit status and stderr lines."""

    code: int
    lines: list[str]
    stdout: str


def failed_start(
    database: Path | str, *args: str, env: Mapping[str, str] | None = None, timeout: float = 30.0
) -> Refusal:
    """Run a server that must refuse to start; fail if it starts or hangs.

    It logs at the default level, so that its stderr is what an operator sees.
    """
    done = subprocess.run(
        command(database, *args, quiet=False),
        capture_output=True,
        text=True,
        env=_environment(env),
        timeout=timeout,
        check=False,
    )
    assert "listening on port" not in done.stdout, "the server started"
    return Refusal(done.returncode, done.stderr.splitlines(), done.stdout)
