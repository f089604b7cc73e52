"""The GPU check's machinery, run here on CPU backends: records, failure detection, reports."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from vlfast.gpucheck import correctness
from vlfast.gpucheck.cases import OPS, Case
from vlfast.gpucheck.report import write_report

CPU = torch.device("cpu")


def test_cli_writes_json_and_markdown(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-m", "vlfast.gpucheck", "--device", "cpu", "--backends", "cpu", "--quick",
                    "--dtypes", "float32", "--ops", "memvp_memory", "--output", str(tmp_path), "--budget", "120"],
                   check=True, env=env)
    summary = json.loads((tmp_path / "gpucheck.json").read_text())
    records = summary["records"]
    awkward = [c for c in OPS["memvp_memory"].cases if c.label == "awkward"]
    assert len(records) == len(awkward) and all(r["status"] == "ok" for r in records)
    assert {c["name"] for c in records[0]["comparisons"]} == {"out", "dx", "dz", "dkey_pos", "dvalue_pos"}
    report = (tmp_path / "gpucheck.md").read_text()
    assert "| memvp_memory | cpu | float32 | 8 | 0 | 0 | 0 |" in report


def test_the_cli_refuses_the_interpreter(tmp_path):
    done = subprocess.run([sys.executable, "-m", "vlfast.gpucheck", "--device", "cpu", "--output", str(tmp_path)],
                          capture_output=True, text=True, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 2 and "TRITON_INTERPRET=1 is set" in done.stderr


def test_a_wrong_kernel_fails_and_a_crash_is_an_error():
    op = OPS["cross_attention"]
    case = Case("cross_attention", dict(B=2, H=2, Lq=5, Lk=9, D=16), "test", "mask")
    inputs = op.make(case, torch.Generator().manual_seed(0))
    assert next(correctness.check_case(op, case, inputs, torch.float32, ["cpu"], CPU))["status"] == "ok"

    def off_by_a_little(inputs, backend):
        return lambda q, k, v: op.oracle(inputs)(q, k, v) * 1.001

    wrong = next(correctness.check_case(replace(op, kernel=off_by_a_little), case, inputs, torch.float32, ["cpu"], CPU))
    assert wrong["status"] == "fail"
    assert not next(c for c in wrong["comparisons"] if c["name"] == "out")["ok"]

    def crash(inputs, backend):
        def run(*tensors):
            raise RuntimeError("launch failed")
        return run

    crashed = next(correctness.check_case(replace(op, kernel=crash), case, inputs, torch.float32, ["cpu"], CPU))
    assert crashed["status"] == "error" and "launch failed" in crashed["reason"]


def test_refusals_are_recorded_with_the_reason():
    op = OPS["memvp_memory"]
    case = Case("memvp_memory", dict(B=1, L=3, M=4, D=8), "test")
    inputs = op.make(case, torch.Generator().manual_seed(0))
    record = next(correctness.check_case(op, case, inputs, torch.float32, ["cuda"], CPU))
    assert record["status"] == "refused" and "CUDA tensors" in record["reason"]


def test_fp16_overflow_cases_fail_a_kernel_with_fp16_intermediates():
    op = OPS["memvp_memory"]
    case = next(c for c in op.cases if c.variant == "large activation")
    inputs = op.make(case, torch.Generator().manual_seed(0))
    record = next(correctness.check_case(op, case, inputs, torch.float16, ["cpu"], CPU))
    assert record["status"] == "ok"

    def plain_fp16(inputs, backend):
        return op.oracle(inputs)  # the plain op: x K^T overflows in fp16

    record = next(correctness.check_case(replace(op, kernel=plain_fp16), case, inputs, torch.float16, ["cpu"], CPU))
    assert record["status"] == "fail"


def test_forward_only_cases_compare_the_named_rows():
    op = OPS["routed_adapter"]
    case = Case("routed_adapter", dict(B=1, L=40, D=16, E=2, R=4), "test", rows=(0, 39))
    inputs = op.make(case, torch.Generator().manual_seed(0))
    record = next(correctness.check_case(op, case, inputs, torch.bfloat16, ["cpu"], CPU))
    assert record["status"] == "ok" and [c["name"] for c in record["comparisons"]] == ["out"]


def test_report_shows_timings_against_eager_and_the_projection(tmp_path):
    timing = {"part": "timing", "op": "memvp_memory", "shape": "B=8", "dtype": "bfloat16", "pass": "forward"}
    summary = {"environment": {"torch": "t", "cuda": "c", "triton": "x", "driver": "d", "commit": "abc"},
               "budget_s": 10, "seconds": 5, "parts": [], "records": [
                   {**timing, "implementation": "eager", "status": "ok", "median_s": 1e-4, "floor_bandwidth": 1e12,
                    "projected_floor_s": 3e-5, "projected_s": 9e-5},
                   {**timing, "implementation": "vlfast triton", "status": "ok", "median_s": 4e-4,
                    "floor_bandwidth": 2.5e11, "projected_floor_s": 3e-5, "projected_s": 4e-5, "graph_s": 8e-5},
                   {"part": "hardware", "hardware": {
                       "name": "H200", "capability": "9.0", "sms": 132, "l2_bytes": 60 * 2**20,
                       "copy_bandwidth_measured": 4.24e12, "bf16_matmul_flops_measured": 7.17e14,
                       "fp32_matmul_flops_measured": 5.1e13}}]}
    write_report(summary, tmp_path / "r.md")
    text = (tmp_path / "r.md").read_text()
    assert "copy 4.24 TB/s (read + write), bf16 matmul 717 TFLOP/s, fp32 matmul (no tf32) 51 TFLOP/s" in text
    assert "| forward | vlfast triton | 400.0 | 0.25x | 250 | 80.0 | 40.0 | 10.00 | 2.00 |" in text
    assert "| memvp_memory | bfloat16 | forward | eager | 100.0 | 1.00x | 1000 |  | 90.0 | 1.11 |  |" in text


def test_timing_records_events_then_graph_time_and_survives_an_uncapturable_call(monkeypatch):
    """The timing loop's bookkeeping, with the two GPU timers replaced by counters: every
    implementation that runs gets its events time, then its CUDA-graph time or why not."""
    from vlfast.costmodel import H100
    from vlfast.gpucheck import timing

    order = []

    def events(call, grads):
        call()
        order.append("events")
        return 1e-3

    def graph(call, grads):
        order.append("graph")
        if len(order) % 3 == 0:
            raise RuntimeError("operation not permitted when stream is capturing")
        return 5e-4

    monkeypatch.setattr(timing, "median_seconds", events)
    monkeypatch.setattr(timing, "graph_seconds", graph)
    monkeypatch.setitem(timing.SHAPES, "cross_attention", dict(B=1, H=2, Lq=4, Lk=9, D=8))
    records = list(timing.time_op("cross_attention", torch.float32, torch.device("cpu"), H100, compile_eager=False))
    ran = [r for r in records if r["status"] == "ok"]
    assert "eager" in {r["implementation"] for r in ran} and len(ran) < len(records)  # SDPA's CUDA kernels refuse
    assert all(("graph_s" in r) != ("graph_reason" in r) for r in ran)
    assert any("graph_reason" in r for r in ran) and any(r.get("graph_s") == 5e-4 for r in ran)
    per_pass = len(ran) // 2
    assert order == (["events"] * per_pass + ["graph"] * per_pass) * 2  # a pass's events before any capture


def test_measured_ceilings_make_the_cost_models_hardware():
    from vlfast.costmodel import H100
    from vlfast.gpucheck.timing import hardware

    measured = {"name": "A100-SXM4-80GB", "sms": 108, "l2_bytes": 40 * 2**20, "copy_bandwidth_measured": 1.9e12,
                "bf16_matmul_flops_measured": 2.8e14, "fp32_matmul_flops_measured": 1.8e13}
    hw = hardware(measured)
    assert (hw.bandwidth, hw.matrix_flops, hw.fp32_flops, hw.sms) == (1.9e12, 2.8e14, 1.8e13, 108)
    assert hw.l2_bandwidth == pytest.approx(H100.l2_bandwidth * 108 / 132)  # not measured: scaled by SMs
