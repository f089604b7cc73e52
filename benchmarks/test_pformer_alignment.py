"""P-Former alignment, measured on the embedded default: epochs to the plain scratch run's best
validation loss, with and without the alignment loss, for training from scratch and for VPGTrans.

`python -m vlfast.pformer train` (defaults) gives the P-Former; `python -m vlfast.transfer` then runs
on the same budget as test_gpu_hours.py, without and with `--pformer` (the aligned runs reuse the
first's source VPG, so all transfer the same one), and once more with a hundredth of the weights.

    pytest benchmarks/test_pformer_alignment.py --benchmark-only
"""
from __future__ import annotations

from benchmarks.results import markdown_table, save_bar_chart, save_json, save_markdown
from benchmarks.test_gpu_hours import BUDGET, BUDGET_OPTIONS
from vlfast.pformer.__main__ import main as pformer_main
from vlfast.transfer.__main__ import main as transfer_main
from vlfast.transfer.report import first_reaching

RUNS = ("scratch", "transfer")
# Alignment weights (stage 1, stage 2 and scratch): the paper's, and a hundredth of them.
WEIGHTS = {"without alignment": None, "alignment 10 / 100": (10, 100), "alignment 0.1 / 1": (0.1, 1)}


def experiment(tmp_path) -> dict:
    pformer_history = pformer_main(["train", "--output-dir", str(tmp_path / "pformer")])
    reports = {"pformer": pformer_history}
    for i, (name, weights) in enumerate(WEIGHTS.items()):
        extra = [] if weights is None else [
            "--source-vpg", str(tmp_path / "run0" / "source" / "vpg"), "--pformer", str(tmp_path / "pformer"),
            f"--pformer-weight-stage1={weights[0]}", f"--pformer-weight-stage2={weights[1]}"]
        reports[name] = transfer_main([*BUDGET_OPTIONS, *extra, "--output-dir", str(tmp_path / f"run{i}")])
    return reports


def test_alignment_epochs_to_target(benchmark, tmp_path):
    """Labelled measurement: one seed, one budget; reported whichever way it goes."""
    benchmark.group = "P-Former alignment experiment, CPU"
    reports = benchmark.pedantic(experiment, args=(tmp_path,), rounds=1, iterations=1)
    plain = reports["without alignment"]
    metric, target = plain["target_metric"], plain["runs"]["scratch"]["best"]
    rows, result = [], {"kind": "measured", "budget": BUDGET, "metric": metric, "target": target,
                        "pformer_history": reports["pformer"], "runs": {}}
    for setting in WEIGHTS:
        for run in RUNS:
            history = reports[setting]["runs"][run]["history"]
            reached = (first_reaching(history, metric, target) or {}).get("epoch")
            name = f"{'VPGTrans' if run == 'transfer' else run}, {setting}"
            best = reports[setting]["runs"][run]["best"]
            result["runs"][name] = {"epochs_to_target": reached, "scores": [h[metric] for h in history], "best": best}
            rows.append([name, reached or f"not in {len(history)}", f"{best:.3f}",
                         " ".join(f"{h[metric]:.3f}" for h in history)])
    assert result["runs"]["scratch, without alignment"]["epochs_to_target"] is not None  # its own best
    assert all(h["val_reconstruction"] > 0 for h in reports["pformer"])
    save_json("pformer_alignment", result)
    recon = [h["val_reconstruction"] for h in reports["pformer"]]
    save_markdown("pformer_alignment", "P-Former alignment (measured, CPU)",
                  f"Target: the plain scratch run's best {metric}, {target:.3f}. Budget: "
                  f"{', '.join(f'{k}={v}' for k, v in BUDGET.items())}; alignment weights given as stage 1 / stage 2 "
                  f"(the scratch run uses the stage-2 weight); all aligned runs transfer the plain run's source "
                  f"VPG. P-Former (`python -m vlfast.pformer train`): validation "
                  f"reconstruction loss {recon[0]:.3f} -> {recon[-1]:.3f} over {len(recon)} epochs.\n\n"
                  + markdown_table(["run", "epochs to target", f"best {metric}", f"{metric} per epoch"], rows))
    names = list(result["runs"])
    save_bar_chart("pformer_alignment", f"Epochs to the plain scratch run's best {metric} (measured; lower is better)",
                   names, {"epochs": [result["runs"][n]["epochs_to_target"] or float("nan") for n in names]},
                   "epochs (not reached: no bar)")
