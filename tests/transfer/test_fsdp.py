"""`--fsdp`: the frozen LLM and the VPG sharded over torchrun's processes (FSDP2, gloo on CPU)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.transfer.conftest import assert_same_vpgs, command, environment, run_cli
from vlfast.transfer.__main__ import main

# Accumulation (FSDP's gradient-sync switch) and clipping (a norm over sharded gradients) both take part.
ARGUMENTS = ["--preset", "smoke", "--no-baseline", "--batch-size", "8", "--grad-accum", "2", "--max-grad-norm", "0.05"]


def weights(out, run: str) -> dict[str, torch.Tensor]:
    return load_file(str(out / run / "vpg" / "model.safetensors"))


def _killed_when_checkpointed(cache, out) -> int:
    """Starts a two-process --fsdp run and kills both processes (SIGKILL, torchrun's workers: its
    children) once the transfer has written a checkpoint: what is left is that checkpoint."""
    process = subprocess.Popen(command(*ARGUMENTS, "--fsdp", "--output-dir", str(out), nproc=2),
                               env=environment(cache), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (out / "transfer" / "checkpoints" / "latest.json").exists():
        assert process.poll() is None
        assert time.monotonic() < deadline
        time.sleep(0.05)
    for worker in Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split():
        os.kill(int(worker), signal.SIGKILL)
    return process.wait(timeout=120)


def test_two_sharded_processes_reach_the_parameters_of_one_and_resume_to_them(tiny_defaults, tmp_path):
    """Sharding moves no arithmetic: the gradients are the DDP run's (reduce-scatter averages as the
    all-reduce does), so the tolerance is the DDP test's (summation order across processes differs
    from one process's in the last bits, which Adam's normalisation can enlarge a little)."""
    one = run_cli(tiny_defaults, *ARGUMENTS, "--batch-size", "16", "--grad-accum", "1",
                  "--output-dir", str(tmp_path / "one"))
    two = run_cli(tiny_defaults, *ARGUMENTS, "--fsdp", "--output-dir", str(tmp_path / "two"), nproc=2)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    assert json.loads((tmp_path / "two" / "report.json").read_text())["processes"] == 2
    assert_same_vpgs(tmp_path / "one", tmp_path / "two")
    # The whole model directory too (its frozen LLM gathered whole for the fingerprint and copy).
    assert (tmp_path / "two" / "transfer" / "model" / "config.json").is_file()

    # Killed after a checkpoint of sharded weights and optimizer states, it resumes to the same numbers.
    assert _killed_when_checkpointed(tiny_defaults, tmp_path / "cut") != 0
    assert not (tmp_path / "cut" / "report.json").exists()
    resumed = run_cli(tiny_defaults, *ARGUMENTS, "--fsdp", "--resume", "--output-dir", str(tmp_path / "cut"), nproc=2)
    assert resumed.returncode == 0, resumed.stderr
    for run in ("source", "transfer"):
        expected, actual = weights(tmp_path / "two", run), weights(tmp_path / "cut", run)
        for name, tensor in expected.items():
            assert torch.equal(actual[name], tensor), f"{run} {name}"
    history = [{k: v for k, v in h.items() if k != "wall_s"}
               for h in json.loads((tmp_path / "cut" / "report.json").read_text())["runs"]["transfer"]["history"]]
    assert history == [{k: v for k, v in h.items() if k != "wall_s"} for h in
                       json.loads((tmp_path / "two" / "report.json").read_text())["runs"]["transfer"]["history"]]


def test_options_that_fsdp_cannot_shard_are_refused(tiny_defaults, tmp_path):
    for option in (["--connector", "memory"], ["--mma"], ["--eval-task", "vqav2", "--eval-data", str(tmp_path)]):
        with pytest.raises(SystemExit, match="fsdp must be off with the memory connector, --mma or --eval-task"):
            main(["--preset", "smoke", "--fsdp", *option, "--output-dir", str(tmp_path / "bad")])
