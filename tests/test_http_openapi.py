"""The OpenAPI document: valid OpenAPI 3.1, exactly the routes served, and true of them.

schemathesis drives a live server (a subprocess with tokens, as deployed) from
the document: every route, positive and negative cases, no 5xx, and every
response conforming to the document (tests/data/schemathesis.toml).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openapi_spec_validator import validate
from starlette.routing import Route

from service.api.auth import Tokens
from service.api.http.app import Options, build_app
from service.api.http.auth import Authenticator
from tests.conftest import Harness
from tests.test_http_api import ok

BIN = Path(sys.executable).parent
CONFIG = Path(__file__).parent / "data" / "schemathesis.toml"


async def test_the_document_is_valid_openapi_3_1(harness: Harness) -> None:
    async with httpx.AsyncClient(base_url=harness.http_url) as http:
        document = ok(await http.get("/openapi.json"))
    assert document["openapi"] == "3.1.0"
    validate(document)


async def test_the_document_describes_exactly_the_routes_served(harness: Harness) -> None:
    async with httpx.AsyncClient(base_url=harness.http_url) as http:
        document = ok(await http.get("/openapi.json"))
    app = build_app(harness.running.manager, Options(auth=Authenticator(Tokens())))
    served = {
        (method, route.path)
        for route in app.routes
        if isinstance(route, Route) and route.include_in_schema  # the console is not API
        for method in route.methods or ()
        if method != "HEAD"
    }
    documented = {
        (method.upper(), path)
        for path, operations in document["paths"].items()
        for method in operations
    }
    assert served == documented
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            assert operation["responses"], (method, path)
            if "{instance_id}" in path:
                assert {"400", "404"} <= set(operation["responses"]), (method, path)
            if operation["security"]:
                assert {"401", "403"} <= set(operation["responses"]), (method, path)


@pytest.fixture
def live_server(tmp_path: Path) -> Iterator[str]:
    """A server subprocess with tokens, as deployed; yields its HTTP base URL."""
    env = {
        **os.environ,
        "SESSION_MANAGER_PUBLIC_TOKEN": "schemathesis-public",
        "SESSION_MANAGER_INTERNAL_TOKEN": "schemathesis-internal",
    }
    server = subprocess.Popen(
        [
            str(BIN / "session-manager"),
            "serve",
            "--address=127.0.0.1:0",
            "--http-address=127.0.0.1:0",
            f"--database={tmp_path / 'db.sqlite'}",
            "--engine=simulated",
            "--log-level=warning",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert server.stdout is not None
        assert server.stdout.readline().startswith("session-manager listening on port ")
        match = re.fullmatch(
            r"session-manager http listening on port (\d+)\n", server.stdout.readline()
        )
        assert match, "no HTTP port announced"
        yield f"http://127.0.0.1:{match[1]}"
    finally:
        server.terminate()
        assert server.wait(timeout=30) == 0


def test_schemathesis_finds_nothing_against_a_live_server(live_server: str, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "SM_PUBLIC_TOKEN": "schemathesis-public",
        "SM_INTERNAL_TOKEN": "schemathesis-internal",
    }
    run = subprocess.run(
        [
            str(BIN / "schemathesis"),
            "--config-file",
            str(CONFIG),
            "run",
            f"{live_server}/openapi.json",
            "--checks=all",
            "--seed=20261123",
            "--workers=1",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=240,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    # Every operation but the document's own address, which schemathesis leaves out.
    assert re.search(r"Tested: +23\b", run.stdout), run.stdout[-3000:]
