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


def best(history: list[dict], metric: str) -> tuple[float, int]:
    """(best score, first epoch reaching it)."""
    scores = [h[metric] for h in history]
    value = min(scores) if direction(metric) == "min" else max(scores)
    return value, scores.index(value) + 1


def epochs_to_reach(history: list[dict], metric: str, target: float) -> int | None:
    return next((h["epoch"] for h in history if better(metric, h[metric], target)), None)


def build(results: dict[str, dict], metric: str, world: int, extra: dict) -> dict:
    """report.json's content. speedup = e_s / e_t: e_s the epoch of the scratch run's best, e_t the
    first epoch the transfer run reaches it (stage 1 is an epoch); speedup_wall, the same ratio in
    training seconds, is also the ratio of compute-hours (both runs use the same processes; each
    run's compute_hours is in its entry)."""
    report = {"target_metric": metric, "better": "lower" if direction(metric) == "min" else "higher",
              "processes": world, **extra, "runs": {}}
    for name, result in results.items():
        value, epoch = best(result["history"], metric)
        report["runs"][name] = {"best": value, "best_epoch": epoch, "epochs_to_target": None,
                                "wall_s": result["wall_s"], "compute_hours": result["wall_s"] * world / 3600,
                                "seconds_per_step": result["wall_s"] / result["steps"] if result.get("steps") else None,
                                "history": result["history"]}
    if "scratch" in results:
        scratch = report["runs"]["scratch"]
        target_epoch = scratch["best_epoch"]
        scratch["epochs_to_target"] = target_epoch
        transfer = report["runs"]["transfer"]
        reached = epochs_to_reach(transfer["history"], metric, scratch["best"])
        transfer["epochs_to_target"] = reached
        if reached is None:
            report |= {"speedup": None, "speedup_wall": None}
        else:
            wall = scratch["history"][target_epoch - 1]["wall_s"] / transfer["history"][reached - 1]["wall_s"]
            report |= {"speedup": target_epoch / reached, "speedup_wall": wall}
    return report


def table(report: dict) -> str:
    """Both runs' validation scores per epoch (loss, CIDEr-D, QA accuracy, and the target metric when
    it is a benchmark's), and the speed-up."""
    runs = {n: report["runs"][n] for n in RUNS if n in report["runs"]}
    metric = report["target_metric"]
    columns = {"val_loss": "loss", "cider": "CIDEr", "qa_accuracy": "QA"}
    if metric not in columns:
        name = metric.rsplit("/", 1)[-1]
        columns[metric] = {"accuracy": "acc", "image_accuracy": "img acc"}.get(name, name[:7])
    width = 8 * len(columns)
    lines = ["       " + "   ".join(f"{name:^{width}}" for name in runs),
             "epoch  " + "   ".join("".join(f"{c:>8}" for c in columns.values()) for _ in runs)]
    for e in range(max(len(r["history"]) for r in runs.values())):
        cells = []
        for run in runs.values():
            entry = run["history"][e] if e < len(run["history"]) else {}
            cells.append("".join(f"{entry[c]:8.3f}" if entry.get(c) is not None else f"{'-':>8}" for c in columns))
        lines.append(f"{e + 1:>5}  " + "   ".join(cells))
    if "converter" in report:
        converter = report["converter"]
        steps = ", ".join(f"{name} {run['seconds_per_step']:.2f} s/step" for name, run in runs.items()
                          if run["seconds_per_step"] is not None)
        lines.append(f"\nword converter: {converter['token_pairs']} token pairs, "
                     f"1 - cos {converter['cosine_loss']:.3f}; {steps}")
    if "speedup" in report:
        scratch, transfer = runs["scratch"], runs["transfer"]
        lines.append(f"\ntarget: the scratch run's best {metric} {scratch['best']:.3f} (epoch {scratch['best_epoch']},"
                     f" {scratch['history'][scratch['best_epoch'] - 1]['wall_s']:.0f} s of training)")
        if report["speedup"] is None:
            lines.append("the transfer run did not reach it: no speed-up")
        else:
            reached = transfer["epochs_to_target"]
            seconds = transfer["history"][reached - 1]["wall_s"]
            lines.append(f"the transfer run reaches it at epoch {reached} ({seconds:.0f} s; stage 1 is an epoch):"
                         f" speed-up {report['speedup']:.2f}x in epochs, {report['speedup_wall']:.2f}x in wall time")
    return "\n".join(lines)


def write(report: dict, directory: Path) -> None:
    (directory / "report.json").write_text(json.dumps(report, indent=1))
    (directory / "report.md").write_text(
        f"# VPGTrans: transfer vs training from scratch\n\n```\n{table(report)}\n```\n\n"
        f"Metric behind the speed-up: `{report['target_metric']}` ({report['better']} is better), on the validation"
        f" split after each epoch; wall_s counts training only. Curves: curves.png.\n")
    if "speedup" in report:
        plot(report, directory / "curves.png")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = report["target_metric"]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for name in RUNS:
        history = report["runs"][name]["history"]
        scores = [h[metric] for h in history]
        axes[0].plot([h["epoch"] for h in history], scores, marker="o", label=name)
        axes[1].plot([h["wall_s"] for h in history], scores, marker="o", label=name)
    target = report["runs"]["scratch"]["best"]
    for axis, label in zip(axes, ("epoch", "training seconds (measured, this machine)"), strict=True):
        axis.axhline(target, color="grey", linestyle="--", linewidth=1, label="scratch best")
        axis.set_xlabel(label)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel(f"validation {metric}")
    axes[0].legend()
    speedup = report["speedup"]
    figure.suptitle(f"VPGTrans vs scratch: speed-up {speedup:.2f}x in epochs" if speedup else
                    "VPGTrans vs scratch: target not reached")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
