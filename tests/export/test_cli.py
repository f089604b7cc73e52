"""`python -m vlfast.export` and `python -m vlfast.generate` on transfer run directories (as a run
writes them, on the tiny default cache of tests/conftest.py), vlfast model directories and the
BLIP-2 directories exported from them."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from transformers import Blip2ForConditionalGeneration

from tests.export.conftest import tiny_model, write_images
from tests.transfer.conftest import environment
from vlfast.export.__main__ import main as export
from vlfast.generate import main as generate
from vlfast.settings import save_config
from vlfast.transfer.__main__ import main as transfer
from vlfast.transfer.config import TransferConfig

GREEDY = ["--num-beams", "1", "--max-new-tokens", "6", "--device", "cpu"]


def transfer_run(directory: Path, *args: str) -> Path:
    """A run directory written by `python -m vlfast.transfer` (a seconds-long run, no baseline)."""
    transfer(["--preset", "smoke", "--no-baseline", "--output-dir", str(directory), *args])
    return directory


def answers(capsys, argv: list[str]) -> list[str]:
    texts = generate(argv)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(texts) and all(line.endswith(f": {text}") for line, text in zip(lines, texts, strict=True))
    return texts


def test_run_directory_to_hf_and_vlfast_give_the_same_answers(tiny_defaults, tmp_path, capsys):
    run = transfer_run(tmp_path / "run")
    images = [str(p) for p in write_images(tmp_path / "images")]
    export([str(run), str(tmp_path / "hf")])
    assert "hf: Hugging Face BLIP-2" in capsys.readouterr().out
    assert Blip2ForConditionalGeneration.from_pretrained(tmp_path / "hf").config.num_query_tokens == 8  # the run's
    export([str(run), str(tmp_path / "vlfast"), "--format", "vlfast"])
    capsys.readouterr()
    from_run = answers(capsys, ["--model", str(run), "--image", *images, *GREEDY])
    assert answers(capsys, ["--model", str(tmp_path / "hf"), "--image", *images, *GREEDY]) == from_run
    assert answers(capsys, ["--model", str(tmp_path / "vlfast"), "--image", *images, *GREEDY]) == from_run
    export([str(tmp_path / "vlfast"), str(tmp_path / "hf-from-vlfast")])  # a vlfast model directory as the source
    capsys.readouterr()
    assert answers(capsys, ["--model", str(tmp_path / "hf-from-vlfast"), "--image", *images, *GREEDY]) == from_run
    beams = answers(capsys, ["--model", str(run), "--image", images[0], "--prompt", "what shape is in the top left ?"])
    assert len(beams) == 1


def test_memory_connector_runs_export_as_vlfast_only(tiny_defaults, tmp_path, capsys):
    run = transfer_run(tmp_path / "run", "--connector", "memory")
    with pytest.raises(SystemExit, match="vlfast.export: error: .*BLIP-2's class cannot express MemVP; "
                                         "VisionLanguageModel.save_pretrained \\(python -m vlfast.export --format "
                                         "vlfast\\) writes a vlfast model directory instead"):
        export([str(run), str(tmp_path / "hf")])
    export([str(run), str(tmp_path / "vlfast"), "--format", "vlfast"])
    capsys.readouterr()
    images = [str(p) for p in write_images(tmp_path / "images")]
    sampled = answers(capsys, ["--model", str(tmp_path / "vlfast"), "--image", *images, "--do-sample",
                               "--temperature", "0.7", "--max-new-tokens", "4"])
    beams = answers(capsys, ["--model", str(tmp_path / "vlfast"), "--image", *images, "--max-new-tokens", "4"])
    assert len(sampled) == len(beams) == 2


def test_generate_as_a_command(tokenizer, tmp_path):
    tiny_model("llama", tokenizer).save_pretrained(tmp_path / "model")
    images = [str(p) for p in write_images(tmp_path / "images", count=3)]
    result = subprocess.run([sys.executable, "-m", "vlfast.generate", "--model", str(tmp_path / "model"), "--image",
                             *images, "--max-new-tokens", "3"], env=environment(tmp_path), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(": ")[0] for line in lines] == images


def test_bad_inputs_are_named_before_loading(tokenizer, tmp_path):
    (tmp_path / "empty").mkdir()
    image = str(write_images(tmp_path / "images", count=1)[0])
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(SystemExit, match="--image .*missing.png: no such file"):
        generate(["--model", str(tmp_path / "empty"), "--image", image, str(tmp_path / "missing.png")])
    with pytest.raises(SystemExit, match="--image .*notes.png: not an image PIL can read"):
        generate(["--model", str(tmp_path / "empty"), "--image", str(tmp_path / "notes.png")])
    holds_none = ("empty holds no model: expected a vlfast model directory \\(config.json from "
                  "VisionLanguageModel.save_pretrained\\), a Hugging Face BLIP-2 directory .* or a python -m "
                  "vlfast.transfer run directory \\(config.yaml\\)")
    with pytest.raises(SystemExit, match=holds_none):
        generate(["--model", str(tmp_path / "empty"), "--image", image])
    with pytest.raises(SystemExit, match=holds_none):
        export([str(tmp_path / "empty"), str(tmp_path / "out")])
    run = tmp_path / "run"
    run.mkdir()
    save_config(TransferConfig(output_dir=str(run)), run)
    with pytest.raises(SystemExit, match="run/scratch/model holds no model: the scratch run of .* did not finish"):
        export([str(run), str(tmp_path / "out"), "--run", "scratch"])


def test_bad_decoding_options_are_refused(tmp_path, capsys):
    image = str(write_images(tmp_path / "images", count=1)[0])
    for options, message in ((["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N"),
                             (["--temperature", "0.5"], "--temperature applies to sampling: add --do-sample")):
        with pytest.raises(SystemExit):
            generate(["--model", str(tmp_path), "--image", image, *options])
        assert message in capsys.readouterr().err
