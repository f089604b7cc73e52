"""gpucheck.md: the device, what passed and failed, and the timings against the alternatives and the
projections."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path


def _worst_ratio(record: dict) -> float:
    """The largest error / bound over the compared tensors (<= 1 passes)."""
    return max((c["error"] / c["bound"] if c["bound"] else float("inf")) for c in record["comparisons"])


def correctness_table(records: list[dict]) -> list[str]:
    counts: dict[tuple, dict] = defaultdict(lambda: defaultdict(int))
    worst: dict[tuple, float] = defaultdict(float)
    for r in records:
        if "backend" not in r:
            continue
        key = (r["op"], r["backend"], r["dtype"])
        counts[key][r["status"]] += 1
        if "comparisons" in r:
            worst[key] = max(worst[key], _worst_ratio(r))
    lines = ["| op | backend | dtype | ok | fail | refused | error | worst error / bound |",
             "|---|---|---|---|---|---|---|---|"]
    for key in sorted(counts):
        c = counts[key]
        lines.append(f"| {' | '.join(key)} | {c['ok']} | {c['fail']} | {c['refused']} | {c['error']} | "
                     f"{worst[key]:.2f} |")
    return lines


def _failed(comparison: dict) -> str:
    if comparison["nan"]:
        return f"{comparison['name']}: NaN"
    return f"{comparison['name']}: {comparison['error']:.2e} > {comparison['bound']:.2e}"


def findings(records: list[dict]) -> list[str]:
    lines = []
    for r in records:
        if r.get("status") in ("ok", None) or r.get("part") != "correctness":
            continue
        where = f"{r['op']} {r.get('backend', '')} {r.get('dtype', '')} [{r['case']}] ({r.get('label', '')})"
        if r["status"] == "fail":
            bad = "; ".join(_failed(c) for c in r["comparisons"] if not c["ok"])
            lines.append(f"- FAIL {where}: {bad}")
        else:
            reason = r.get("reason", "").splitlines()[0] if r.get("reason") else ""
            lines.append(f"- {r['status']} {where}: {reason}")
    return lines


def timing_table(records: list[dict]) -> list[str]:
    rows = [r for r in records if r.get("part") == "timing"]
    eager = {(r["op"], r["dtype"], r["pass"]): r["median_s"] for r in rows
             if r["implementation"] == "eager" and r["status"] == "ok"}
    lines = ["| op | dtype | pass | implementation | median us | eager / this | useful GB/s | CUDA graph us | "
             "projected us | measured / projected | graph / projected |", "|---" * 11 + "|"]
    for r in rows:
        head = f"| {r['op']} | {r['dtype']} | {r['pass']} | {r['implementation']} |"
        if r["status"] != "ok":
            lines.append(f"{head} {r['status']}: {r.get('reason', '').splitlines()[0][:120]} | | | | | | |")
            continue
        base = eager.get((r["op"], r["dtype"], r["pass"]))
        speedup = f"{base / r['median_s']:.2f}x" if base else ""
        bandwidth = f"{r['floor_bandwidth'] / 1e9:.0f}" if "floor_bandwidth" in r else ""
        graph = f"{r['graph_s'] * 1e6:.1f}" if "graph_s" in r else "not capturable" if "graph_reason" in r else ""
        projected = f"{r['projected_s'] * 1e6:.1f}" if "projected_s" in r else ""
        ratio = f"{r['median_s'] / r['projected_s']:.2f}" if "projected_s" in r else ""
        graph_ratio = f"{r['graph_s'] / r['projected_s']:.2f}" if "projected_s" in r and "graph_s" in r else ""
        lines.append(f"{head} {r['median_s'] * 1e6:.1f} | {speedup} | {bandwidth} | {graph} | {projected} | {ratio} | "
                     f"{graph_ratio} |")
    return lines


def write_report(summary: dict, path: Path) -> None:
    env, records = summary["environment"], summary["records"]
    hardware = next((r["hardware"] for r in records if "hardware" in r), None)
    changed = env.get("files_changed_since_commit")
    lines = ["# vlfast GPU check (measured)", "",
             f"torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, driver {env['driver']}, "
             f"vlfast commit {env['commit'] or 'unknown'}{' + changes to ' + ', '.join(changed) if changed else ''}; "
             f"{summary['seconds']:.0f} s of a {summary['budget_s']:.0f} s "
             "budget.", ""]
    if hardware:
        lines += [f"Device: {hardware['name']} (sm_{hardware['capability'].replace('.', '')}, {hardware['sms']} SMs, "
                  f"{hardware['l2_bytes'] / 2**20:.0f} MiB L2); measured now: copy "
                  f"{hardware['copy_bandwidth_measured'] / 1e12:.2f} TB/s (read + write), bf16 matmul "
                  f"{hardware['bf16_matmul_flops_measured'] / 1e12:.0f} TFLOP/s"
                  + (f", fp32 matmul (no tf32) {hardware['fp32_matmul_flops_measured'] / 1e12:.0f} TFLOP/s"
                     if "fp32_matmul_flops_measured" in hardware else "")  # runs before 2026-12-01 lack it
                  + ". Projections below use these measured ceilings.", ""]
    lines += ["## Correctness against the float64 reference", "",
              "Tolerance: flash-attention's rule (error <= 2x, gradients 3x, plain PyTorch's own error in the "
              "same dtype); outputs poisoned with NaN first.", "", *correctness_table(records), ""]
    found = findings(records)
    lines += ["Every case that did not pass:", "", *(found or ["- none"]), ""]
    lines += ["## Timings (CUDA events, median, L2 flushed before each run)", "",
              "Useful GB/s: the op's one-read-one-write bytes over the measured time. CUDA graph: the same call "
              "replayed from a CUDA graph after an L2 flush, GPU time without the host's. Projected: "
              "vlfast.costmodel's model of the kernel as launched (fused Triton) or of the eager chain, at the "
              "measured ceilings; it models GPU time, so graph / projected is the model's error and measured / "
              "graph the host's share.", "",
              *timing_table(records), ""]
    memcheck = summary.get("memcheck_records", [])
    if memcheck:
        ok = sum(r.get("status") == "ok" for r in memcheck)
        lines += ["## compute-sanitizer memcheck", "",
                  f"The small cases again under `compute-sanitizer --tool memcheck`: {ok} of {len(memcheck)} records "
                  "ok (the rest refused); each part's error summary is below.", ""]
    lines += ["## Parts", "", "| part | exit | seconds |", "|---|---|---|"]
    lines += [f"| {p['part']} | {p['returncode']} | {p['seconds']:.0f} |" for p in summary["parts"]]
    for p in summary["parts"]:
        if p["part"].startswith("memcheck") or p["returncode"] not in (0,):
            tail = p["output_tail"].strip().splitlines()[-12:]
            lines += ["", f"### {p['part']} (exit {p['returncode']})", "", "```", *tail, "```"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
