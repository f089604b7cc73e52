"""`python -m vlfast.transfer` on streamed data: webdataset shards written here (shapes scenes, so
that the default LLMs know their words), a mixture, unusable samples, and resuming mid-epoch."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import torch
import webdataset as wds
from safetensors.torch import load_file

import vlfast.transfer.data
from tests.transfer.conftest import command, environment, run_cli
from vlfast.data.shapes import write_shards
from vlfast.transfer.__main__ import main
from vlfast.transfer.report import epoch_ends

STREAMED = ("--preset", "smoke", "--no-baseline", "--samples-per-epoch", "64", "--val-data", "shapes")


def shards(tmp_path, broken: bool = False) -> str:
    """64 scenes in 4 shards; with `broken` a fifth shard of an undecodable image and a sample without one."""
    pattern = write_shards(str(tmp_path / "shards"), 64, 16, image_size=32)
    if not broken:
        return pattern
    with wds.TarWriter(str(tmp_path / "shards" / "00004.tar")) as sink:
        sink.write({"__key__": "broken", "png": b"not an image", "txt": "a small red circle"})
        sink.write({"__key__": "imageless", "txt": "a small red circle"})
    return pattern.replace("00003", "00004")


def test_the_in_memory_features_are_gone():
    assert not hasattr(vlfast.transfer.data, "Split")


def test_shards_with_an_unusable_sample_on_the_fly_and_cached(tiny_defaults, tmp_path, capsys):
    pattern = shards(tmp_path, broken=True)
    out = tmp_path / "fly"
    report = main([*STREAMED, "--data", f"wds:{pattern}", "--feature-cache", "none", "--output-dir", str(out)])
    assert [h["epoch"] for h in epoch_ends(report["runs"]["transfer"]["history"])] == [1, 2]
    result = json.loads((out / "transfer" / "result.json").read_text())
    assert result["skipped_samples"] >= 2  # both samples of 00004.tar, each time it is read
    assert "unusable samples skipped" in capsys.readouterr().err
    main([*STREAMED, "--data", f"wds:{pattern}", "--feature-cache", str(tmp_path / "cache"),
          "--output-dir", str(tmp_path / "cached")])
    assert "2 unusable samples left out of the feature cache" in capsys.readouterr().err
    assert list((tmp_path / "cache").glob("*/000000.tar"))


def test_a_mixture_of_shards_and_shapes(tiny_defaults, tmp_path):
    pattern = shards(tmp_path)
    report = main([*STREAMED, "--data", f"wds:{pattern}=0.7,shapes=0.3", "--workers", "1",
                   "--output-dir", str(tmp_path / "run")])
    history = epoch_ends(report["runs"]["transfer"]["history"])
    assert len(history) == 2 and all(h["qa_accuracy"] is not None for h in history)


def test_a_run_killed_mid_epoch_resumes_with_the_samples_it_had_not_seen(tiny_defaults, tmp_path):
    arguments = [*STREAMED, "--data", f"wds:{shards(tmp_path)}", "--workers", "2"]
    whole = run_cli(tiny_defaults, *arguments, "--output-dir", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "cut"
    process = subprocess.Popen(command(*arguments, "--output-dir", str(out)), env=environment(tiny_defaults),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out / "transfer" / "checkpoints" / "latest.json").exists():  # step 2 of an epoch's 4
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    state = torch.load(next((out / "transfer" / "checkpoints").glob("checkpoint-*")) / "state.pt", weights_only=False)
    assert state["data"][0]["batches"] % 4 != 0  # the stream stopped mid-epoch
    resumed = run_cli(tiny_defaults, "--resume", "--output-dir", str(out))
    assert resumed.returncode == 0, resumed.stderr
    expected = json.loads((tmp_path / "whole" / "report.json").read_text())["runs"]["transfer"]["history"]
    actual = json.loads((out / "report.json").read_text())["runs"]["transfer"]["history"]
    assert [{k: v for k, v in h.items() if k != "wall_s"} for h in actual] == [
        {k: v for k, v in h.items() if k != "wall_s"} for h in expected]
    for name, tensor in load_file(str(tmp_path / "whole" / "transfer" / "vpg" / "model.safetensors")).items():
        assert torch.equal(load_file(str(out / "transfer" / "vpg" / "model.safetensors"))[name], tensor), name


PEAK_RSS = """
import resource, sys
from vlfast.transfer.__main__ import main
main(sys.argv[1:])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def test_a_run_over_ten_times_the_data_takes_no_more_memory(tiny_defaults, tmp_path):
    """3000 images of 256 x 256 (560 MiB decoded, 2.2 GiB as float32 tensors), every one read by the
    feature cache and every epoch, peak within 60 MiB of a run over 300."""
    from io import BytesIO

    from PIL import Image

    def write(directory, count: int) -> str:
        directory.mkdir()
        with wds.ShardWriter(f"{directory}/%03d.tar", maxcount=500, verbose=0) as sink:
            for i in range(count):
                image = BytesIO()
                Image.new("RGB", (256, 256), (i % 256, 40, 90)).save(image, format="PNG")
                sink.write({"__key__": f"{i:06d}", "png": image.getvalue(), "txt": "a small red circle"})
        return f"{directory}/{{000..{(count - 1) // 500:03d}}}.tar"

    peaks = {}
    for count in (300, 3000):
        pattern = write(tmp_path / f"data{count}", count)
        arguments = [*STREAMED, "--data", f"wds:{pattern}", "--samples-per-epoch", str(count), "--batch-size", "64",
                     "--feature-cache", str(tmp_path / f"cache{count}"), "--output-dir", str(tmp_path / f"run{count}")]
        done = subprocess.run([sys.executable, "-c", PEAK_RSS, *arguments], env=environment(tiny_defaults),
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        peaks[count] = int(done.stdout.split()[-1])
    print(f"peak RSS, MiB: {peaks}")
    assert peaks[3000] - peaks[300] < 60, peaks
