"""Running `python -m vlfast.transfer` in a subprocess (torchrun, killed runs) on the tiny default
cache of tests/conftest.py."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


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
