"""Tiny stand-ins for the default LMs, built once per test session into a cache that in-process
runs and subprocesses (torchrun, killed runs) both read through VLFAST_CACHE."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vlfast import defaults

TINY_LMS = {
    "source": defaults.LMSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, steps=3, seed=1),
    "target": defaults.LMSpec(hidden_size=48, num_layers=2, num_heads=2, intermediate_size=96, steps=3, seed=2),
}


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vlfast-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLFAST_CACHE", str(root))
        patch.setattr(defaults, "LMS", TINY_LMS)
        defaults.build_all()
    return root


@pytest.fixture
def tiny_defaults(tiny_cache, monkeypatch) -> Path:
    monkeypatch.setenv("VLFAST_CACHE", str(tiny_cache))
    monkeypatch.setattr(defaults, "LMS", TINY_LMS)
    return tiny_cache


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
