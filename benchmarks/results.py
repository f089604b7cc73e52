"""Writing benchmark results people compare: JSON, a markdown table and a matplotlib PNG per
benchmark, and summary.md over a whole session (benchmarks/conftest.py)."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).parent / "results"
# Markdown sections written in this session, in order, for summary.md.
SECTIONS: dict[str, str] = {}


def save_json(name: str, rows: list[dict] | dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(rows, indent=1) + "\n")
    return path


def save_markdown(name: str, title: str, text: str) -> Path:
    """`text` under a heading in <name>.md, and as a section of this session's summary.md."""
    RESULTS.mkdir(exist_ok=True)
    SECTIONS[name] = f"## {title}\n\n{text.strip()}\n"
    path = RESULTS / f"{name}.md"
    path.write_text(SECTIONS[name])
    return path


def markdown_table(header: list[str], rows: list[list]) -> str:
    align = ["---" if i == 0 else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def save_bar_chart(name: str, title: str, labels: list[str], series: dict[str, list[float]], ylabel: str,
                   log: bool = False) -> Path:
    """Grouped bars: one group per label, one bar per series."""
    RESULTS.mkdir(exist_ok=True)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(labels)), 4))
    width = 0.8 / len(series)
    for i, (series_name, values) in enumerate(series.items()):
        positions = [x + (i - (len(series) - 1) / 2) * width for x in range(len(labels))]
        bars = ax.bar(positions, values, width, label=series_name)
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
    ax.set_xticks(range(len(labels)), [textwrap.fill(label, 18) for label in labels], fontsize=8)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = RESULTS / f"{name}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _cell(key: str, value) -> str:
    if isinstance(value, str):
        return value
    if key.endswith("_bytes"):
        return f"{value / 1e6:.2f}"
    if key.endswith("_flops"):
        return f"{value / 1e9:.2f}"
    return f"{value:.2f}"


def _column(key: str) -> str:
    for suffix, unit in (("_bytes", " MB"), ("_flops", " GFLOP"), ("_us", " µs")):
        if key.endswith(suffix):
            return key.removesuffix(suffix).replace("_", " ") + unit
    return key.replace("_", " ")


def save_projection(name: str, title: str, rows: list[dict]) -> None:
    """An op's projected rows as JSON and as a markdown table of their scalar fields."""
    save_json(name, rows)
    keys = [k for k, v in rows[0].items() if isinstance(v, str | int | float)]
    table = markdown_table([_column(k) for k in keys], [[_cell(k, row[k]) for k in keys] for row in rows])
    save_markdown(name, title, f"Projected (vlfast.costmodel; no GPU measured).\n\n{table}")
