"""GPU-hours that VPGTrans and vlfast save.

Measured (this CPU): `python -m vlfast.transfer` on the embedded default with a reduced budget;
compute-hours (process-hours of training) of the scratch run and of the VPGTrans run, to the
scratch run's best score and in all, and their ratio.
Projected (no GPU here): vlfast.costmodel at the paper's scale, first the paper's OPT-2.7B ->
OPT-6.7B runs (631.5 and 59.0 A100-hours reported), then vlfast's changes line by line.

    pytest benchmarks/test_gpu_hours.py --benchmark-only
"""
from __future__ import annotations

import shutil

from benchmarks import results
from benchmarks.results import markdown_table, save_bar_chart, save_json, save_markdown
from vlfast.costmodel import A100, PAPER, transfer_lines
from vlfast.costmodel.training import against_paper, markdown
from vlfast.transfer.__main__ import main as transfer_main

# 2 CPU cores: about two minutes of training (the default budget is 1000 images x 6 epochs).
BUDGET = {"train_images": 600, "val_images": 200, "epochs": 5, "source_epochs": 8}
BUDGET_OPTIONS = [f"--{k.replace('_', '-')}={v}" for k, v in BUDGET.items()]


def hours_to_target(run: dict) -> float:
    """Training process-hours up to the first validation reaching the target (NaN if none did)."""
    step = run["steps_to_target"]
    if not step:
        return float("nan")
    wall_s = next(h["wall_s"] for h in run["history"] if h["step"] == step)
    return wall_s * run["compute_hours"] / run["wall_s"]


def measured_row(name: str, run: dict) -> list:
    return [name, f"{run['best']:.3f} (epoch {run['best_epoch']})", run["epochs_to_target"] or "not reached",
            f"{hours_to_target(run):.5f}", f"{run['compute_hours']:.5f}"]


def test_measured_small_scale(benchmark, tmp_path):
    """Labelled measurement: one run, its hours are this CPU's process-hours of training."""
    benchmark.group = "python -m vlfast.transfer, reduced budget, CPU"
    report = benchmark.pedantic(transfer_main, args=(BUDGET_OPTIONS + ["--output-dir", str(tmp_path / "run")],),
                                rounds=1, iterations=1)
    runs = report["runs"]
    scratch, transfer = runs["scratch"], runs["transfer"]
    assert scratch["epochs_to_target"] == scratch["best_epoch"]
    assert all(h["wall_s"] > 0 for h in scratch["history"] + transfer["history"])
    ratio_all = scratch["compute_hours"] / transfer["compute_hours"]
    result = {"kind": "measured", "budget": BUDGET, "metric": report["target_metric"],
              "speedup": report["speedup"], "speedup_epochs": report["speedup_epochs"],
              "speedup_compute_hours": report["speedup_wall"], "ratio_whole_runs": ratio_all,
              "processes": report["processes"],
              "runs": {n: {k: v for k, v in r.items() if k != "history"} for n, r in runs.items()}}
    benchmark.extra_info["measured"] = result
    save_json("gpu_hours_measured", result)
    shutil.copy(tmp_path / "run" / "curves.png", results.RESULTS / "gpu_hours_measured_curves.png")
    rows = [measured_row(name, runs[name]) for name in ("scratch", "transfer")]
    speedup = report["speedup_wall"]
    text = (f"Measured: `python -m vlfast.transfer {' '.join(BUDGET_OPTIONS)}` ({report['processes']} process, CPU). "
            f"Target: the scratch run's best {report['target_metric']}.\n\n"
            + markdown_table(["run", "best", "epochs to target", "compute-hours to target", "compute-hours, whole run"],
                             rows)
            + "\n\nscratch / VPGTrans compute-hours to the target: "
            + (f"**{speedup:.2f}x**" if speedup else "not reached")
            + f" ({report['speedup']}x in epochs at every validation, {report['speedup_epochs']}x at epoch ends); "
              f"whole runs: {ratio_all:.2f}x. The source VPG's training "
              f"({runs['source']['compute_hours']:.5f} h) is not counted, as in the paper.")
    save_markdown("gpu_hours_measured", "GPU-hours, measured at small scale (CPU)", text)
    series = {name: [hours_to_target(runs[name]), runs[name]["compute_hours"]] for name in ("scratch", "transfer")}
    save_bar_chart("gpu_hours_measured", "Compute-hours, scratch and VPGTrans (measured, CPU)",
                   ["to the scratch run's best", "whole run"], series, "process-hours (measured)")


def test_projected_paper_scale(benchmark):
    """Labelled projection: the paper's pair reproduced within 25%, then vlfast's changes."""
    lines = benchmark(transfer_lines, *PAPER["pair"])
    checks = against_paper(lines)
    assert set(checks) == {"scratch", "VPGTrans"}
    for name, check in checks.items():
        assert abs(check["error"]) <= 0.25, (name, check)
    projected = [ln for ln in lines if ln.kind == "projected" and not ln.label.startswith("(")]
    assert all(a.gpu_hours >= b.gpu_hours for a, b in zip(projected[1:], projected[2:], strict=False))
    result = {"kind": "projected", "gpu": A100.name, "lines": [vars(ln) for ln in lines], "against_paper": checks}
    benchmark.extra_info["projected"] = result
    save_json("gpu_hours_projected", result)
    source, target = PAPER["pair"]
    save_markdown("gpu_hours_projected", f"GPU-hours at the paper's scale, {source} -> {target} (projected)",
                  f"`python -m vlfast.costmodel --source {source} --target {target}`\n\n" + markdown(lines))
    shown = [ln for ln in lines if not ln.label.startswith("(")]
    save_bar_chart("gpu_hours_projected", f"VPG for {target}: A100-hours, reported by the paper and projected",
                   [ln.label if ln.kind == "reported" else f"{ln.label} (projected)" for ln in shown],
                   {"A100-hours": [ln.gpu_hours for ln in shown]},
                   "A100-hours (reported / projected)", log=True)
