import os

# No GPU here: the triton backend is timed through its CPU interpreter (a correctness tool, so its
# times say nothing about GPU speed). Must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import datetime  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from benchmarks import results  # noqa: E402

torch.manual_seed(0)
# The baseline each group's times are divided by, when it ran: the first benchmark whose name holds one of these.
BASELINES = ("-hf-blip2]", "[eager")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """With benchmarks on, results/ receives the tables and charts, and pytest-benchmark's JSON
    unless --benchmark-json says otherwise. Run as plain tests (--benchmark-disable), the same code
    writes to a temporary directory instead, leaving the committed results alone."""
    if config.getoption("benchmark_disable", False):
        results.RESULTS = Path(tempfile.mkdtemp(prefix="vlfast-benchmark-results-"))
    elif config.getoption("benchmark_json", None) is None:
        results.RESULTS.mkdir(exist_ok=True)
        config.option.benchmark_json = results.RESULTS / "benchmark.json"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, no GPU"


def cpu_times(benchmarks) -> str:
    """One table per group: mean and median time of each benchmark, and its ratio to the group's baseline."""
    groups: dict[str, list] = {}
    for bench in benchmarks:
        if bench.stats and "projected" not in bench.name:  # those time the cost model: see their own sections
            groups.setdefault(bench.group or "other", []).append(bench)
    sections = []
    for group, members in groups.items():
        baseline = next((b for key in BASELINES for b in members if key in b.name), None)
        rows = []
        for b in sorted(members, key=lambda b: b.stats.median):
            ratio = f"{baseline.stats.median / b.stats.median:.2f}x" if baseline else ""
            rows.append([b.name, f"{b.stats.mean * 1e3:.2f}", f"{b.stats.median * 1e3:.2f}", b.stats.rounds, ratio])
        header = ["benchmark", "mean ms", "median ms", "rounds",
                  f"speed-up vs {baseline.name}" if baseline else "speed-up"]
        sections.append(f"### {group}\n\n" + results.markdown_table(header, rows))
    return "\n\n".join(sections)


def pytest_sessionfinish(session):
    """summary.md: the date and machine, measured CPU times per group, then this session's sections."""
    bench_session = getattr(session.config, "_benchmarksession", None)
    if bench_session is None or bench_session.disabled or not bench_session.benchmarks:
        return
    head = (f"# vlfast benchmarks\n\n{datetime.date.today().isoformat()} on {machine()}: "
            f"`pytest benchmarks/ --benchmark-only`. CPU times are measured; GPU figures are projected "
            f"(vlfast.costmodel), never measured.\n")
    body = "## CPU times (measured)\n\n" + cpu_times(bench_session.benchmarks)
    (results.RESULTS / "summary.md").write_text("\n\n".join([head, body, *results.SECTIONS.values()]))


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """results/benchmark.json keeps each benchmark's statistics but not its every round (a
    megabyte of samples per run); a path given with --benchmark-json gets everything."""
    if config.getoption("benchmark_json") == results.RESULTS / "benchmark.json":
        for bench in output_json["benchmarks"]:
            bench["stats"].pop("data", None)
