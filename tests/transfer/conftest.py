"""Running `python -m vlfast.transfer` in a subprocess (torchrun, killed runs) on the tiny default
cache of tests/conftest.py."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from vlfast.models import VPG


def command(*args: str, nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "vlfast.transfer", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "vlfast.transfer", *args]


def environment(cache: Path) -> dict:
    return {**os.environ, "VLFAST_CACHE": str(cache), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def run_cli(cache: Path, *args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    return subprocess.run(command(*args, nproc=nproc), env=environment(cache), capture_output=True, text=True,
                          timeout=600)


def assert_same_vpgs(expected_dir: Path, actual_dir: Path, runs: tuple[str, ...] = ("source", "transfer")) -> None:
    """The runs' trained VPGs agree (rtol 1e-4, atol 5e-5), except the cross-attention keys' biases:
    softmax ignores a shift shared by all keys, so their gradient is zero up to rounding, and Adam,
    which divides by the gradient's own scale, turns that rounding into steps of the learning rate
    that depend on the order of the sums (processes, accumulation). Other parameters with a gradient
    near zero drift the same way, less: two processes against one, on a 2-core AMD EPYC (MKL), left
    one transfer-run element of 24,576 1.6e-5 apart; one process training on half the batch alone (what
    processes that never average would do) ends 0.08 apart."""
    for run in runs:
        expected = load_file(str(expected_dir / run / "vpg" / "model.safetensors"))
        actual = load_file(str(actual_dir / run / "vpg" / "model.safetensors"))
        assert actual.keys() == expected.keys()
        width = VPG.from_pretrained(expected_dir / run / "vpg").config.qformer.hidden_size
        for name, tensor in expected.items():
            got = actual[name]
            if name.endswith("cross_key_value.bias"):  # per cross-attention layer: keys, then values
                values = torch.arange(tensor.numel()) // width % 2 == 1
                tensor, got = tensor[values], got[values]
            torch.testing.assert_close(got, tensor, rtol=1e-4, atol=5e-5, msg=f"{run} {name}")
