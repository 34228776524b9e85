"""The benchmarks: the /proc CPU reading, and ``python -m bench --quick`` end to end.

The quick run checks that every figure is measured and reported, not how fast
anything is: timings on a shared machine are the benchmark's business, not a
test's.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bench.cpu import TICKS_PER_SECOND, cpu_seconds

ROOT = Path(__file__).resolve().parent.parent
TICK = 1 / TICKS_PER_SECOND

# Two threads burn CPU until the process has used 0.3 s, then it reports its own
# count and waits. Its name holds ") (" to check the parsing of /proc/PID/stat.
BURNER = textwrap.dedent("""
    import sys, threading, time
    with open("/proc/self/comm", "w") as comm:
        comm.write("a) (b c")
    def burn():
        while time.process_time() < 0.3:
            pass
    threads = [threading.Thread(target=burn) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(time.process_time(), flush=True)
    sys.stdin.read()
""")

# The first cell of each row of the CPU table, as a regular expression, and its target.
SIZED = ", against a bare reply of as many bytes"
CPU_ROWS = {
    re.escape("GetSession"): "—",
    re.escape("GetSession" + SIZED): "≤ 1.10 x",
    re.escape("RequestQR, valid QR (returns it again)"): "—",
    re.escape("RequestQR, valid QR (returns it again)" + SIZED): "≤ 1.10 x",
    re.escape("ListSessions, page of 50"): "≤ 2.00 x",
    re.escape("ListSessions, page of 50" + SIZED): "—",
    re.escape("Send, new idempotency key (durable)"): "≤ 2.00 x",
    re.escape("Send, repeated idempotency key (replay)"): "—",
    re.escape("ReportError, one committed change (durable)"): "—",
    r"WatchSession, one change to [\d,]+ watchers \(per watcher\)": "—",
}
# The first cells of figures of the first table (each a prefix).
FIGURES = (
    "GetSession QPS / bare",
    "Send accepted per second",
    "server memory per open",
    "server start-up with",
    "server CPU time of that start-up",
    "new QR PNG",
)
REPLY_BYTES = r"Reply bytes: GetSession ([\d,]+), RequestQR ([\d,]+), ListSessions ([\d,]+)\."


def test_cpu_seconds_is_what_the_process_itself_counts_over_all_its_threads() -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", BURNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        own_count = float(process.stdout.readline())
        assert Path(f"/proc/{process.pid}/comm").read_text().strip() == "a) (b c"
        measured = cpu_seconds(process.pid)
        assert own_count >= 0.3
        assert abs(measured - own_count) <= 3 * TICK, (measured, own_count)
    finally:
        process.kill()
        process.wait()


def _row(text: str, first_cell: str) -> list[str]:
    """The cells of the one table row whose first cell matches ``first_cell`` (a regex)."""
    rows = [
        cells
        for line in text.splitlines()
        if line.startswith("| ")
        and re.fullmatch(first_cell, (cells := [c.strip() for c in line.strip("|").split("|")])[0])
    ]
    assert len(rows) == 1, f"expected one row {first_cell!r} in:\n{text}"
    return rows[0]


def _number(cell: str) -> float:
    match = re.match(r"[0-9.e+]+", cell)
    assert match, cell
    return float(match.group())


@pytest.mark.timeout(300)
def test_quick_benchmark_reports_server_cpu_per_call_against_the_bare_baseline(
    tmp_path: Path,
) -> None:
    output = tmp_path / "RESULTS.md"
    earlier = "## 2026-11-01: an earlier run\n\nIts tables.\n"
    workers = "## Engine workers: resident memory per worker\n\nTheir table.\n"
    output.write_text(f"# Benchmark results\n\n{earlier}\n{workers}")

    finished = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--label", "ci", f"--output={output}"],
        cwd=ROOT, capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert finished.returncode == 0, finished.stderr[-2000:]

    text = output.read_text()
    # The new section sits after the earlier run's, which is kept, and before the workers'.
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings[0] == "## 2026-11-01: an earlier run"
    assert re.fullmatch(r"## \d{4}-\d{2}-\d{2}: ci", headings[1])
    assert headings[2] == "## Engine workers: resident memory per worker"
    assert "Its tables." in text
    assert "Their table." in text

    for name, wanted in CPU_ROWS.items():
        _, server, spread, bare, ratio, ratio_spread, runs, target, met = _row(text, name)
        assert server.endswith(" µs")
        assert bare.endswith(" µs")
        assert ratio.endswith(" x")
        assert _number(server) > 0
        assert _number(bare) > 0
        assert _number(ratio) > 0
        assert re.fullmatch(r"\d+ to \d+", spread)
        assert re.fullmatch(r"[0-9.]+ to [0-9.]+", ratio_spread)
        assert runs == "2"
        assert target == wanted
        verdict = _number(ratio) <= _number(target.removeprefix("≤ ")) if target != "—" else None
        assert met == {True: "yes", False: "**no**", None: "—"}[verdict], (name, ratio, met)
    for name in FIGURES:
        assert _number(_row(text, re.escape(name) + ".*")[1]) > 0
    # The sized baseline answered as many bytes as each call, and says how many.
    sizes = re.search(REPLY_BYTES, text)
    assert sizes, text
    assert all(int(size.replace(",", "")) > 100 for size in sizes.groups())


# The rows of the cluster benchmark's table, each with a value and a ratio (or "baseline").
CLUSTER_ROWS = (
    "SQLite single node, kill -9 and started again: seconds until all connected",
    "SQLite single node, kill -9 and started again: sessions back per second",
    "GetSession CPU, SQLite node / bare no-op",
    *(
        row.format(label=label)
        for label in ("1 node", "2 nodes", "3 nodes")
        for row in (
            "{label} take over: seconds until all connected / SQLite",
            "{label} take over: sessions moved per second / SQLite",
            "GetSession CPU, node of {label} / SQLite node",
            "GetSession CPU, node of {label} / bare no-op",
            "GetSession, PostgreSQL's CPU per call ({label})",
        )
    ),
)


@pytest.mark.timeout(300)
def test_quick_cluster_benchmark_reports_failover_and_cpu_for_one_to_three_nodes(
    tmp_path: Path,
) -> None:
    output = tmp_path / "RESULTS.md"
    workers = "## Engine workers: resident memory per worker\n\nTheir table.\n"
    output.write_text(f"# Benchmark results\n\n{workers}")

    finished = subprocess.run(
        [sys.executable, "-m", "bench.cluster", "--quick", f"--output={output}"],
        cwd=ROOT, capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert finished.returncode == 0, finished.stderr[-2000:]

    text = output.read_text()
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings == [
        "## Several nodes over PostgreSQL",
        "## Engine workers: resident memory per worker",
    ]
    for name in CLUSTER_ROWS:
        _, median, spread, ratio, runs = _row(text, re.escape(name))
        # PostgreSQL may do no measurable work for a few reads a node answers from memory.
        assert _number(median) > 0 or "PostgreSQL" in name, name
        assert re.fullmatch(r"[0-9.e+]+ to [0-9.e+]+", spread), spread
        assert ratio == "baseline" or re.fullmatch(r"[0-9.]+ x \([0-9.]+ to [0-9.]+\)", ratio)
        assert runs == "1"
    for name in CLUSTER_ROWS:
        if "/ " in name:
            assert _row(text, re.escape(name))[3] != "baseline", name


@pytest.mark.timeout(300)
def test_quick_event_log_benchmark_reports_what_the_log_adds(tmp_path: Path) -> None:
    output = tmp_path / "RESULTS.md"
    workers = "## Engine workers: resident memory per worker\n\nTheir table.\n"
    output.write_text(f"# Benchmark results\n\n{workers}")

    finished = subprocess.run(
        [sys.executable, "-m", "bench.event_log", "--quick", f"--output={output}"],
        cwd=ROOT, capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert finished.returncode == 0, finished.stderr[-2000:]

    text = output.read_text()
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings == [
        "## Event log: what it adds to a committed change",
        "## Engine workers: resident memory per worker",
    ]
    for name in ("ReportError, one committed change", "Send, new idempotency key"):
        _, logged, unlogged, bare, ratio, spread, adds, met = _row(text, re.escape(name) + ".*")
        assert _number(logged) > 0
        assert _number(unlogged) > 0
        assert _number(bare) > 0
        assert _number(ratio) > 0
        assert re.fullmatch(r"[0-9.]+ to [0-9.]+", spread)
        assert re.fullmatch(r"[+-]\d+ %", adds)
        assert met in ("yes", "**no**", "—")
