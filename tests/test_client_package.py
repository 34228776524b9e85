"""The Python client installed alone, as Central Hub would: a fresh virtual environment.

The wheel of ``client/python`` is built from a copy of its sources and
installed with its dependencies only (from the package index, or pip's cache):
none of the server's (neonize, aiosqlite, ...) may come with it. Then the
example of docs/central-hub-python.md and ``smctl`` run from that environment
against a server.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
SERVER_ONLY = {"session-manager", "neonize", "aiosqlite", "prometheus-client", "qrcode", "pillow"}


@pytest.fixture(scope="module")
def standalone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtual environment holding the client distribution and its dependencies only."""
    root = tmp_path_factory.mktemp("standalone")
    source = root / "source"
    shutil.copytree(
        ROOT / "client/python",
        source,
        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"),
    )
    build = [*PIP, "wheel", "--quiet", "--no-deps", "--no-build-isolation"]
    subprocess.run([*build, "--wheel-dir", str(root / "dist"), str(source)], check=True)
    (wheel,) = (root / "dist").glob("sessionmanager_client-*.whl")
    venv.create(root / "venv", with_pip=False)
    python = root / "venv/bin/python"
    install = [*PIP, "--python", str(python), "install", "--quiet", str(wheel)]
    subprocess.run(install, check=True, timeout=240)
    return root / "venv/bin"


@pytest.fixture(scope="module")
def address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = ServerProcess.start(tmp_path_factory.mktemp("server") / "sessions.db")
    try:
        yield server.address
    finally:
        server.stop()


def run(command: list[str], address: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run away from the repository, so that nothing of it is importable by accident."""
    environment = {"SESSION_MANAGER_ADDRESS": address, "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        command, env=environment, cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def test_only_client_dependencies_are_installed(standalone: Path) -> None:
    listing = subprocess.run(
        [*PIP, "--python", str(standalone / "python"), "list", "--format", "json"],
        capture_output=True,
        text=True,
        check=True,
    )
    installed = {entry["name"].lower() for entry in json.loads(listing.stdout)}
    assert "sessionmanager-client" in installed
    assert not installed & SERVER_ONLY, installed & SERVER_ONLY
    assert {"grpcio", "protobuf", "grpcio-status"} <= installed

    probe = (
        "import importlib.util, sessionmanager_client, sessionmanager.v1.session_pb2 as s;"
        "print(sessionmanager_client.__file__); print(s.__file__);"
        "print(importlib.util.find_spec('service'), importlib.util.find_spec('client'))"
    )
    done = run([str(standalone / "python"), "-c", probe], "", standalone)
    assert done.returncode == 0, done.stderr
    client_file, generated_file, missing = done.stdout.splitlines()
    assert client_file.startswith(str(standalone.parent))
    assert generated_file.startswith(str(standalone.parent))
    assert missing == "None None"


def test_documented_example_runs_from_the_client_alone(
    standalone: Path, address: str, tmp_path: Path
) -> None:
    page = (ROOT / "docs" / "central-hub-python.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", page, re.S)
    script = tmp_path / "example.py"
    script.write_text(code)
    for _ in range(2):  # the second run finds the session connected and replays the send
        done = run([str(standalone / "python"), str(script)], address, tmp_path)
        assert done.returncode == 0, done.stderr
    assert "connected -> send" in done.stdout
    assert "replayed" in done.stdout


def test_smctl_comes_with_the_client(standalone: Path, address: str) -> None:
    smctl = str(standalone / "smctl")
    assert run([smctl, "create", "sender_pkg"], address, standalone).returncode == 0
    shown = run([smctl, "get", "sender_pkg", "--json"], address, standalone)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["status"] == "init"
    missing = run([smctl, "get", "sender_none"], address, standalone)
    assert missing.returncode == 3
    assert missing.stderr.startswith("smctl: SESSION_NOT_FOUND: ")
