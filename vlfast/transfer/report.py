"""The comparison of the transfer and scratch runs: speed-up as VPGTrans defines it (SPEC.md
section 6), report.json, report.md and curves.png."""
from __future__ import annotations

import json
from pathlib import Path

from vlfast.transfer.config import direction

RUNS = ("scratch", "transfer")


def better(metric: str, a: float, b: float) -> bool:
    """a at least as good as b."""
    return a <= b if direction(metric) == "min" else a >= b


def best(history: list[dict], metric: str) -> tuple[float, dict]:
    """(best score, the first validation reaching it)."""
    scores = [h[metric] for h in history]
    value = min(scores) if direction(metric) == "min" else max(scores)
    return value, history[scores.index(value)]


def first_reaching(history: list[dict], metric: str, target: float) -> dict | None:
    """The first validation at least as good as `target`, or None."""
    return next((h for h in history if better(metric, h[metric], target)), None)


def epoch_ends(history: list[dict]) -> list[dict]:
    """The validations at epoch ends: what VPGTrans's epoch counts see."""
    return [h for h in history if isinstance(h["epoch"], int)]


def build(results: dict[str, dict], metric: str, world: int, extra: dict, unit: str = "epoch") -> dict:
    """report.json's content. speedup = n_s / n_t: n_s the steps to the scratch run's best, n_t those
    the transfer run takes to first reach it (stage 1 included), over every validation (a quarter
    epoch apart by default); both runs take the same steps per epoch, so the ratio is the same in
    steps and in epochs, and `unit` (epoch, or step for a --max-steps run) only says which the report
    counts in. speedup_epochs is the paper's count: the same over the epoch-end validations only.
    speedup_wall, the ratio in training seconds, is also the ratio of compute-hours (both runs use
    the same processes; each run's compute_hours is in its entry)."""
    report = {"target_metric": metric, "better": "lower" if direction(metric) == "min" else "higher",
              "processes": world, "unit": unit, **extra, "runs": {}}
    for name, result in results.items():
        value, entry = best(result["history"], metric)
        report["runs"][name] = {"best": value, "best_epoch": entry["epoch"], "best_step": entry["step"],
                                "epochs_to_target": None, "steps_to_target": None,
                                "wall_s": result["wall_s"], "compute_hours": result["wall_s"] * world / 3600,
                                "seconds_per_step": result["wall_s"] / result["steps"] if result.get("steps") else None,
                                "history": result["history"]}
    if "scratch" in results:
        scratch, transfer = report["runs"]["scratch"], report["runs"]["transfer"]
        scratch["epochs_to_target"], scratch["steps_to_target"] = scratch["best_epoch"], scratch["best_step"]
        reached = first_reaching(transfer["history"], metric, scratch["best"])
        if reached is None:
            report |= {"speedup": None, "speedup_wall": None}
        else:
            transfer["epochs_to_target"], transfer["steps_to_target"] = reached["epoch"], reached["step"]
            report |= {"speedup": scratch["best_step"] / reached["step"],
                       "speedup_wall": _target_entry(scratch)["wall_s"] / reached["wall_s"]}
        report["speedup_epochs"] = None
        scratch_ends, transfer_ends = epoch_ends(scratch["history"]), epoch_ends(transfer["history"])
        if scratch_ends and transfer_ends:
            target, at = best(scratch_ends, metric)
            reached = first_reaching(transfer_ends, metric, target)
            report["speedup_epochs"] = at["epoch"] / reached["epoch"] if reached else None
    return report


def _target_entry(run: dict) -> dict:
    return next(h for h in run["history"] if h["step"] == run["steps_to_target"])


def _epochs(epoch: int | float) -> str:
    return str(epoch) if isinstance(epoch, int) else f"{epoch:.2f}"


def table(report: dict) -> str:
    """Both runs' validation scores at each validation (loss, CIDEr-D, QA accuracy, and the target
    metric when it is a benchmark's; "-" where a validation between epoch ends did not compute it) by
    step and epoch, and the speed-ups."""
    runs = {n: report["runs"][n] for n in RUNS if n in report["runs"]}
    metric, steps = report["target_metric"], report.get("unit") == "step"
    columns = {"val_loss": "loss", "cider": "CIDEr", "qa_accuracy": "QA"}
    if metric not in columns:
        name = metric.rsplit("/", 1)[-1]
        columns[metric] = {"accuracy": "acc", "image_accuracy": "img acc"}.get(name, name[:7])
    width = 8 * len(columns)
    point = " step  epoch  "
    lines = [" " * len(point) + "   ".join(f"{name:^{width}}" for name in runs),
             point + "   ".join("".join(f"{c:>8}" for c in columns.values()) for _ in runs)]
    for e in range(max(len(r["history"]) for r in runs.values())):
        cells, at = [], None
        for run in runs.values():
            entry = run["history"][e] if e < len(run["history"]) else {}
            at = at or entry
            cells.append("".join(f"{entry[c]:8.3f}" if entry.get(c) is not None else f"{'-':>8}" for c in columns))
        lines.append(f"{at['step']:>5}  {_epochs(at['epoch']):>5}  " + "   ".join(cells))
    if "converter" in report:
        converter = report["converter"]
        per_step = ", ".join(f"{name} {run['seconds_per_step']:.2f} s/step" for name, run in runs.items()
                             if run["seconds_per_step"] is not None)
        lines.append(f"\nword converter: {converter['token_pairs']} token pairs (occurrences), "
                     f"1 - cos {converter['cosine_loss']:.3f}; {per_step}")
    if "speedup" in report:
        scratch, transfer = runs["scratch"], runs["transfer"]

        def at(run: dict) -> str:
            """Where the run reaches the target: its step and epoch."""
            return f"step {run['steps_to_target']}, epoch {_epochs(run['epochs_to_target'])}"

        lines.append(f"\ntarget: the scratch run's best {metric} {scratch['best']:.3f} ({at(scratch)}, "
                     f"{_target_entry(scratch)['wall_s']:.0f} s of training)")
        if report["speedup"] is None:
            lines.append("the transfer run did not reach it: no speed-up")
        else:
            lines.append(f"the transfer run reaches it at {at(transfer)} ({_target_entry(transfer)['wall_s']:.0f} s):"
                         f" speed-up {report['speedup']:.2f}x in {'steps' if steps else 'epochs'}, "
                         f"{report['speedup_wall']:.2f}x in wall time")
        if report.get("speedup_epochs") is not None:
            lines.append(f"counted at epoch ends only (VPGTrans's count; stage 1 is an epoch): "
                         f"{report['speedup_epochs']:.2f}x")
    return "\n".join(lines)


def write(report: dict, directory: Path) -> None:
    (directory / "report.json").write_text(json.dumps(report, indent=1))
    (directory / "report.md").write_text(
        f"# VPGTrans: transfer vs training from scratch\n\n```\n{table(report)}\n```\n\n"
        f"Metric behind the speed-up: `{report['target_metric']}` ({report['better']} is better), on the validation"
        f" split at each validation (every epoch end with all scores, and every --eval-every steps, a quarter epoch by"
        f" default, with the metric alone); wall_s counts training"
        f" only. Curves: curves.png.\n")
    if "speedup" in report:
        plot(report, directory / "curves.png")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, unit = report["target_metric"], report.get("unit", "epoch")
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for name in RUNS:
        history = report["runs"][name]["history"]
        scores = [h[metric] for h in history]
        axes[0].plot([h[unit] for h in history], scores, marker="o", label=name)
        axes[1].plot([h["wall_s"] for h in history], scores, marker="o", label=name)
    target = report["runs"]["scratch"]["best"]
    for axis, label in zip(axes, (unit, "training seconds (measured, this machine)"), strict=True):
        axis.axhline(target, color="grey", linestyle="--", linewidth=1, label="scratch best")
        axis.set_xlabel(label)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel(f"validation {metric}")
    axes[0].legend()
    speedup = report["speedup"]
    figure.suptitle(f"VPGTrans vs scratch: speed-up {speedup:.2f}x in {unit}s" if speedup else
                    "VPGTrans vs scratch: target not reached")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
