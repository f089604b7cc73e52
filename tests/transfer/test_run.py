"""`python -m vlfast.transfer --preset smoke` end to end on tiny stand-ins for the default LMs:
what it writes, YAML configs, bad inputs, resuming after a kill, and torchrun."""
from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.transfer.conftest import assert_same_vpgs, command, environment, run_cli
from vlfast.models import VPG, VisionLanguageModel
from vlfast.patch import is_patched
from vlfast.transfer.__main__ import main
from vlfast.transfer.report import epoch_ends

SCORES = ("val_loss", "cider", "qa_accuracy")


def scores(report: dict) -> dict:
    return {run: [{k: h[k] for k in SCORES} for h in r["history"]] for run, r in report["runs"].items()}


def test_smoke_run_writes_everything(tiny_defaults, tmp_path, capsys):
    out = tmp_path / "run"
    report = main(["--preset", "smoke", "--output-dir", str(out)])
    saved = json.loads((out / "report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["target_metric"] == "val_loss" and set(saved["runs"]) == {"source", "transfer", "scratch"}
    assert isinstance(saved["speedup"], float) or saved["speedup"] is None
    for name in ("transfer", "scratch"):
        run = saved["runs"][name]
        assert {"best", "epochs_to_target", "wall_s", "history"} <= set(run)
        # Validated every quarter epoch (2 of its 8 steps): all scores at epoch ends, the metric in between.
        assert [h["epoch"] for h in run["history"]] == [0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75, 2]
        assert all(isinstance(h[k], float) for h in epoch_ends(run["history"]) for k in SCORES)
        between = [h for h in run["history"] if not isinstance(h["epoch"], int)]
        assert all(h["cider"] is None and h["qa_accuracy"] is None for h in between)
        assert VPG.from_pretrained(out / name / "vpg").config.llm_hidden_size == 48
    assert [h["stage"] for h in saved["runs"]["transfer"]["history"]] == ["stage 1"] * 4 + ["stage 2"] * 4
    assert [h["epoch"] for h in saved["runs"]["source"]["history"]] == [1]  # not compared: epoch ends only
    assert (out / "report.md").read_text().startswith("# VPGTrans")
    assert (out / "curves.png").stat().st_size > 10_000
    assert yaml.safe_load((out / "config.yaml").read_text())["train_images"] == 64
    assert "speed-up" in capsys.readouterr().out or saved["speedup"] is None


def test_tensorboard_can_read_the_metrics(tiny_defaults, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    main(["--preset", "smoke", "--no-baseline", "--output-dir", str(tmp_path / "run")])
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard" / "transfer")).Reload()
    assert {"train/loss", "train/lr", "val/val_loss", "val/cider", "val/qa_accuracy"} <= set(events.Tags()["scalars"])
    assert len(events.Scalars("val/val_loss")) == 8 and len(events.Scalars("val/cider")) == 2
    assert len(events.Scalars("train/loss")) == 16  # 2 epochs of (64 captions + 64 questions) / batches of 16


def test_no_baseline_and_yaml_config(tiny_defaults, tmp_path):
    settings = tmp_path / "settings.yaml"
    settings.write_text("baseline: false\nconverter_epochs: 2\nmetric: cider\n")
    report = main(["--preset", "smoke", "--config", str(settings), "--seed", "3", "--output-dir", str(tmp_path / "r")])
    assert "scratch" not in report["runs"] and "speedup" not in report and report["target_metric"] == "cider"
    written = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    chosen = (written["baseline"], written["converter_epochs"], written["seed"], written["batch_size"])
    assert chosen == (False, 2, 3, 16)


def test_a_given_source_vpg_is_transferred_not_trained(tiny_defaults, tmp_path):
    main(["--preset", "smoke", "--no-baseline", "--output-dir", str(tmp_path / "first")])
    report = main(["--preset", "smoke", "--no-baseline", "--source-vpg", str(tmp_path / "first" / "source" / "vpg"),
                   "--output-dir", str(tmp_path / "second")])
    assert "source" not in report["runs"] and not (tmp_path / "second" / "source").exists()


@pytest.mark.parametrize("arguments, message", [
    (["--source-vpg", "/nowhere/vpg"], "--source-vpg /nowhere/vpg: no such directory"),
    (["--target-llm", "/nowhere/llm"], "--target-llm /nowhere/llm: no such directory"),
    (["--config", "/nowhere.yaml"], "--config /nowhere.yaml: no such file"),
    (["--data", "coco:/nowhere"], "--data 'coco:/nowhere': coco:/nowhere: no such directory"),
    (["--connector", "side"], "connector must be input or memory, got 'side'"),
    (["--epochs", "1"], "epochs must be at least 2"),
    (["--data", "wds:/nowhere/{0..3}.tar"], "--data wds:/nowhere/{0..3}.tar: no shard matches the pattern"),
    (["--val-data", "coco:/nowhere"], "--val-data 'coco:/nowhere': coco:/nowhere: no such directory"),
    (["--samples-per-epoch", "0"], "samples_per_epoch must be a positive number"),
    (["--workers", "-1"], "workers must be 0 or more"),
    (["--on-error", "ignore"], "on_error must be skip or raise"),
])
def test_bad_input_stops_before_training(tiny_defaults, tmp_path, capsys, arguments, message):
    with pytest.raises(SystemExit) as stop:
        main(["--preset", "smoke", "--output-dir", str(tmp_path / "run"), *arguments])
    assert message in str(stop.value.code)
    assert not (tmp_path / "run").exists()


def test_unknown_config_key(tiny_defaults, tmp_path):
    settings = tmp_path / "settings.yaml"
    settings.write_text("epochs: 3\nlearning_rate: 0.1\n")
    with pytest.raises(SystemExit, match="unknown setting.s. learning_rate; known: source_vpg"):
        main(["--config", str(settings), "--output-dir", str(tmp_path / "run")])


def test_source_vpg_of_another_llm_width(tiny_defaults, tmp_path):
    main(["--preset", "smoke", "--no-baseline", "--output-dir", str(tmp_path / "first")])
    # the transfer run's VPG projects to the target LM's width (48), not the source's (32)
    with pytest.raises(SystemExit, match="projects to 48 but the source LLM's hidden size is 32"):
        main(["--preset", "smoke", "--source-vpg", str(tmp_path / "first" / "transfer" / "vpg"),
              "--output-dir", str(tmp_path / "second")])


def test_output_dir_of_another_run(tiny_defaults, tmp_path):
    out = str(tmp_path / "run")
    main(["--preset", "smoke", "--no-baseline", "--output-dir", out])
    with pytest.raises(SystemExit, match="holds another run .config.yaml.; pass --resume"):
        main(["--preset", "smoke", "--output-dir", out])
    with pytest.raises(SystemExit, match="seed=5 differ from the run's"):
        main(["--preset", "smoke", "--resume", "--seed", "5", "--output-dir", out])
    with pytest.raises(SystemExit, match="holds no run to resume"):
        main(["--resume", "--output-dir", str(tmp_path / "empty")])
    # A copied run resumes where it now is, not in the directory its saved settings name.
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (tmp_path / "run" / "report.json").unlink()
    main(["--resume", "--output-dir", str(copy)])
    assert (copy / "report.json").is_file() and not (tmp_path / "run" / "report.json").exists()
    assert yaml.safe_load((copy / "config.yaml").read_text())["output_dir"] == str(copy)


def _kill_when_checkpointed(cache, out, signum, run="transfer") -> subprocess.CompletedProcess:
    """Starts a smoke run and sends `signum` once `run` has written its first checkpoint."""
    process = subprocess.Popen(command("--preset", "smoke", "--output-dir", str(out)), env=environment(cache),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out / run / "checkpoints" / "latest.json").exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_resume_after_a_kill_gives_the_uninterrupted_numbers(tiny_defaults, tmp_path, signum):
    whole = run_cli(tiny_defaults, "--preset", "smoke", "--output-dir", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    killed = _kill_when_checkpointed(tiny_defaults, tmp_path / "cut", signum)
    assert killed.returncode in (128 + signum, -signum), killed.stderr
    assert not (tmp_path / "cut" / "report.json").exists()
    if signum == signal.SIGTERM:
        assert "checkpoint written" in killed.stderr and "--resume" in killed.stderr
    resumed = run_cli(tiny_defaults, "--resume", "--output-dir", str(tmp_path / "cut"))
    assert resumed.returncode == 0, resumed.stderr
    expected = json.loads((tmp_path / "whole" / "report.json").read_text())
    actual = json.loads((tmp_path / "cut" / "report.json").read_text())
    assert scores(actual) == scores(expected)
    for run in ("transfer", "scratch"):
        for name, tensor in load_file(str(tmp_path / "whole" / run / "vpg" / "model.safetensors")).items():
            assert torch.equal(load_file(str(tmp_path / "cut" / run / "vpg" / "model.safetensors"))[name], tensor)


def test_two_processes_reach_the_parameters_of_one(tiny_defaults, tmp_path):
    arguments = ["--preset", "smoke", "--no-baseline", "--source-epochs", "2"]
    one = run_cli(tiny_defaults, *arguments, "--output-dir", str(tmp_path / "one"))
    two = run_cli(tiny_defaults, *arguments, "--output-dir", str(tmp_path / "two"), nproc=2)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    assert json.loads((tmp_path / "two" / "report.json").read_text())["processes"] == 2
    assert_same_vpgs(tmp_path / "one", tmp_path / "two")


def _save_llm(directory, vocab_size: int) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    from vlfast import defaults

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=40, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
    LlamaForCausalLM(config).save_pretrained(directory)
    defaults.shapes_tokenizer().save_pretrained(directory)
    return str(directory)


def test_a_target_llm_from_a_directory(tiny_defaults, tmp_path):
    llm = _save_llm(tmp_path / "llm", vocab_size=64)
    report = main(["--preset", "smoke", "--no-baseline", "--target-llm", llm, "--output-dir", str(tmp_path / "run")])
    assert VPG.from_pretrained(tmp_path / "run" / "transfer" / "vpg").config.llm_hidden_size == 40
    assert len(epoch_ends(report["runs"]["transfer"]["history"])) == 2


def test_a_tokenizer_larger_than_its_llm(tiny_defaults, tmp_path):
    llm = _save_llm(tmp_path / "llm", vocab_size=10)
    with pytest.raises(SystemExit, match="the tokenizer has [0-9]+ tokens but the LLM embeds only 10"):
        main(["--preset", "smoke", "--target-llm", llm, "--output-dir", str(tmp_path / "run")])


def test_coco_data_from_a_local_folder(tiny_defaults, tmp_path):
    import numpy as np
    from PIL import Image

    for split in ("train2017", "val2017"):
        (tmp_path / "coco" / split).mkdir(parents=True)
        images, annotations = [], []
        for i in range(6):
            Image.fromarray(np.full((30, 40, 3), 40 * i, dtype=np.uint8)).save(tmp_path / "coco" / split / f"{i}.jpg")
            images.append({"id": i, "file_name": f"{i}.jpg"})
            annotations += [{"image_id": i, "caption": "a small red circle"}, {"image_id": i, "caption": "a circle"}]
        (tmp_path / "coco" / "annotations").mkdir(exist_ok=True)
        (tmp_path / "coco" / "annotations" / f"captions_{split}.json").write_text(
            json.dumps({"images": images, "annotations": annotations}))
    with pytest.raises(SystemExit, match="the default LLMs only know the shapes vocabulary"):
        main(["--preset", "smoke", "--data", f"coco:{tmp_path / 'coco'}", "--output-dir", str(tmp_path / "no")])
    source, target = _save_llm(tmp_path / "source", 64), _save_llm(tmp_path / "target", 64)
    report = main(["--preset", "smoke", "--data", f"coco:{tmp_path / 'coco'}", "--source-llm", source,
                   "--target-llm", target, "--batch-size", "4", "--output-dir", str(tmp_path / "run")])
    history = epoch_ends(report["runs"]["transfer"]["history"])
    assert len(history) == 2 and history[0]["qa_accuracy"] is None and history[0]["cider"] >= 0


def test_memory_connector_with_adapters(tiny_defaults, tmp_path):
    report = main(["--preset", "smoke", "--connector", "memory", "--mma", "--output-dir", str(tmp_path / "run")])
    assert set(report["runs"]) == {"source", "transfer", "scratch"}
    weights = load_file(str(next((tmp_path / "run" / "scratch" / "checkpoints").glob("checkpoint-*"))
                            / "trainable.safetensors"))
    assert any("vlfast_memvp" in name for name in weights) and any("vlfast_mma" in name for name in weights)
    model = VisionLanguageModel.from_pretrained(tmp_path / "run" / "scratch" / "model")  # all that trained, saved
    assert model.connector == "memory" and is_patched(model.llm, "memvp") and is_patched(model.llm, "mma")


def _save_t5(directory) -> str:
    from transformers import T5Config, T5ForConditionalGeneration

    from vlfast import defaults

    tokenizer = defaults.shapes_tokenizer()
    config = T5Config(vocab_size=len(tokenizer), d_model=40, d_ff=56, d_kv=20, num_layers=1, num_decoder_layers=1,
                      num_heads=2, feed_forward_proj="gated-gelu", pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    T5ForConditionalGeneration(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def test_a_decoder_only_source_transferred_to_an_encoder_decoder_target(tiny_defaults, tmp_path):
    """VPGTrans's FlanT5 pairing in miniature: the default (Llama-architecture) source to a T5 target,
    with the frozen LLMs held in bf16."""
    t5 = _save_t5(tmp_path / "t5")
    report = main(["--preset", "smoke", "--target-llm", t5, "--llm-dtype", "bf16",
                   "--output-dir", str(tmp_path / "run")])
    for run in ("transfer", "scratch"):
        history = report["runs"][run]["history"]
        assert len(epoch_ends(history)) == 2 and all(math.isfinite(h["val_loss"]) for h in history)
    assert VPG.from_pretrained(tmp_path / "run" / "transfer" / "vpg").config.llm_hidden_size == 40
    refused = "the memory connector and --mma patch the LLM's layers, but .*model_type 't5'"
    with pytest.raises(SystemExit, match=refused):
        main(["--preset", "smoke", "--target-llm", t5, "--connector", "memory", "--output-dir", str(tmp_path / "no")])


def test_a_lavis_checkpoint_as_the_source_vpg(tiny_defaults, tmp_path):
    from tests.models.test_lavis import lavis_state

    torch.save({"model": lavis_state("opt_proj", vision=96, llm=32)}, tmp_path / "blip2_pretrained_tiny.pth")
    report = main(["--preset", "smoke", "--no-baseline", "--source-vpg", str(tmp_path / "blip2_pretrained_tiny.pth"),
                   "--output-dir", str(tmp_path / "run")])
    assert "source" not in report["runs"] and len(epoch_ends(report["runs"]["transfer"]["history"])) == 2
    torch.save({"model": {"foo": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(SystemExit, match="not a LAVIS checkpoint"):
        main(["--preset", "smoke", "--source-vpg", str(tmp_path / "other.pth"), "--output-dir", str(tmp_path / "no")])
