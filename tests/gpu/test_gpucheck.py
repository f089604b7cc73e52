"""The GPU check's small cases on a CUDA device: every triton and cuda backend against the float64
reference. Skipped where there is no CUDA device (as in CI); `python -m vlfast.gpucheck` runs the
full check with the large shapes and the timings."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the GPU check needs one")


def test_small_cases_pass_on_every_gpu_backend(tmp_path):
    # The kernels must run compiled: the test session's TRITON_INTERPRET=1 (tests/conftest.py) is removed.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-m", "vlfast.gpucheck", "--quick", "--no-sanitizer", "--output", str(tmp_path),
                    "--budget", "300"], check=True, env=env)
    summary = json.loads((tmp_path / "gpucheck.json").read_text())
    checked = [r for r in summary["records"] if r.get("part") == "correctness"]
    assert checked and all(r["status"] in ("ok", "refused") for r in checked), [
        r for r in checked if r["status"] not in ("ok", "refused")]
    assert {r["backend"] for r in checked if r["status"] == "ok"} == {"triton", "cuda"}
