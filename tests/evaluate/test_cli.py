"""`python -m vlfast.evaluate` end to end on exported shapes scenes: every task, trained against
untrained, scoring a predictions file, torchrun shards, bad input, and `vlfast.transfer --eval-task`."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.evaluate.conftest import SCENES
from vlfast import defaults
from vlfast.evaluate.__main__ import main
from vlfast.evaluate.tasks import TASKS, numeric_scores
from vlfast.evaluate.vqa_metric import vqa_scores

PROMPTS = {"vqav2": "{}", "okvqa": "{}", "gqa": "{}", "coco_caption": "", "nocaps": "", "scienceqa": "{question}"}


def evaluate(model, task: str, data, out, *extra: str) -> dict:
    return main(["--model", str(model), "--task", task, "--data", str(data), "--prompt", PROMPTS[task],
                 "--output-dir", str(out), "--workers", "0", *extra])


@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_writes_its_official_predictions_and_scores(models, benchmarks, tmp_path, task):
    result = evaluate(models["trained"], task, benchmarks[task], tmp_path, "--limit", "6", "--num-beams", "2")
    written = TASKS[task].read(tmp_path / result["predictions"])
    assert len(written) == 6
    assert result["task"] == task and result["limit"] == 6 and result["generation.num_beams"] == 2
    assert set(TASKS[task].metrics) <= set(numeric_scores(result["scores"]))
    assert (tmp_path / "scores.md").read_text().startswith(f"# {TASKS[task].title}")
    # The same file, scored without a model, gives the same scores.
    again = main(["--predictions", str(tmp_path / result["predictions"]), "--task", task, "--data",
                  str(benchmarks[task]), "--limit", "6", "--output-dir", str(tmp_path / "again")])
    assert again["scores"] == result["scores"]


def test_a_trained_model_scores_above_an_untrained_one(models, benchmarks, tmp_path):
    """Captions: the tiny stand-in LMs are too weak to answer questions after a smoke run (both
    score 0 on VQA), but their captions already name the scene's shapes."""
    scores = {name: evaluate(model, "coco_caption", benchmarks["coco_caption"], tmp_path / name)["scores"]
              for name, model in models.items()}
    assert scores["trained"]["CIDEr"] > scores["untrained"]["CIDEr"] + 0.1
    assert scores["trained"]["Bleu_1"] > scores["untrained"]["Bleu_1"]


def test_vqa_scores_follow_the_predictions_file(models, benchmarks, tmp_path):
    result = evaluate(models["trained"], "vqav2", benchmarks["vqav2"], tmp_path)
    predictions = {e["question_id"]: e["answer"] for e in json.loads((tmp_path / result["predictions"]).read_text())}
    annotations = json.loads((benchmarks["vqav2"] / "v2_mscoco_val2014_annotations.json").read_text())["annotations"]
    assert len(predictions) == len(annotations) > SCENES
    assert result["scores"] == vqa_scores(predictions, annotations)
    # Made right: every question's answer from the annotations scores 100.
    right = tmp_path / "right.json"
    right.write_text(json.dumps([{"question_id": a["question_id"], "answer": a["multiple_choice_answer"]}
                                 for a in annotations]))
    perfect = main(["--predictions", str(right), "--task", "vqav2", "--data", str(benchmarks["vqav2"]),
                    "--output-dir", str(tmp_path / "right")])
    assert perfect["scores"]["accuracy"] == 100.0


def test_torchrun_shards_give_the_single_process_scores(models, benchmarks, tmp_path, tiny_cache):
    arguments = ["--model", str(models["trained"]), "--task", "gqa", "--data", str(benchmarks["gqa"]), "--prompt",
                 "{}", "--limit", "13", "--workers", "0", "--num-beams", "2"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "VLFAST_CACHE": str(tiny_cache)}
    launchers = {1: [sys.executable, "-m", "vlfast.evaluate"],
                 2: [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                     "vlfast.evaluate"]}
    outputs = {}
    for nproc, launcher in launchers.items():
        done = subprocess.run([*launcher, *arguments, "--output-dir", str(tmp_path / str(nproc))], env=environment,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        outputs[nproc] = json.loads((tmp_path / str(nproc) / "scores.json").read_text())
    assert outputs[2]["processes"] == 2 and outputs[1]["processes"] == 1
    assert outputs[2]["scores"] == outputs[1]["scores"]
    files = [(tmp_path / str(n) / outputs[n]["predictions"]).read_text() for n in (1, 2)]
    assert files[0] == files[1]


def test_missing_predictions_are_reported_not_scored(benchmarks, tmp_path, capsys):
    annotations = json.loads((benchmarks["vqav2"] / "v2_mscoco_val2014_annotations.json").read_text())["annotations"]
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps([{"question_id": a["question_id"], "answer": "red"} for a in annotations[3:]]))
    with pytest.raises(SystemExit, match=r"3 of \d+ ids have no prediction \(first: \[100, 101, 102\]\)"):
        main(["--predictions", str(partial), "--task", "vqav2", "--data", str(benchmarks["vqav2"])])
    assert not (tmp_path / "scores.json").exists()


@pytest.mark.parametrize("arguments, message", [
    (["--task", "vqav2", "--data", "/nowhere"], "--data /nowhere: no such directory"),
    (["--task", "gqa", "--split", "train"], "split of gqa must be one of testdev | val, got 'train'"),
    (["--task", "vqav2", "--prompt", "{nope}"], "--prompt '{nope}': this task's prompts can use {question}"),
    (["--task", "coco_caption", "--prompt", "Q: {}"], "--prompt 'Q: {}': this task's prompts can use none"),
    (["--task", "vqav2", "--num-beams", "0"], "num-beams must be at least 1, got 0"),
])
def test_bad_input_is_named_before_the_model_loads(benchmarks, arguments, message):
    data = [] if "--data" in arguments else ["--data", str(benchmarks[arguments[1]])]
    with pytest.raises(SystemExit, match=message.replace("(", r"\(").replace("{", r"\{").replace("|", r"\|")):
        main(["--model", "/nowhere/model", *arguments, *data])


def test_missing_image_named(benchmarks, tmp_path):
    import shutil

    data = tmp_path / "scienceqa"
    shutil.copytree(benchmarks["scienceqa"], data)
    first = json.loads((data / "pid_splits.json").read_text())["test"][0]
    (data / "images" / "test" / first / "image.png").unlink()
    with pytest.raises(SystemExit, match=f"images are missing, first {data}/images/test/{first}/image.png"):
        main(["--model", "/nowhere", "--task", "scienceqa", "--data", str(data)])


def test_transfer_scores_a_benchmark_every_epoch(tiny_defaults, benchmarks, tmp_path):
    from vlfast.transfer.__main__ import main as transfer

    out = tmp_path / "run"
    report = transfer(["--preset", "smoke", "--eval-task", "gqa", "--eval-data", str(benchmarks["gqa"]),
                       "--eval-prompt", "{}", "--eval-limit", "20", "--metric", "gqa/accuracy_exact",
                       "--output-dir", str(out)])
    assert report["target_metric"] == "gqa/accuracy_exact" and report["better"] == "higher"
    for run in ("transfer", "scratch"):
        history = report["runs"][run]["history"]
        assert all(isinstance(h["gqa/accuracy_exact"], float) and isinstance(h["gqa/accuracy"], float)
                   for h in history)
        # The metric's benchmark is scored at every validation, between epoch ends too.
        assert [h["epoch"] for h in history] == [0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75, 2]
        assert (out / run / "eval" / "step-2" / "scores.json").is_file()
        saved = json.loads((out / run / "eval" / "epoch-2" / "scores.json").read_text())
        assert saved["scores"]["accuracy_exact"] == history[-1]["gqa/accuracy_exact"]
        assert saved["scores"]["questions"] == 20
    assert "gqa/accuracy_exact" in (out / "report.md").read_text()


@pytest.mark.parametrize("arguments, message", [
    (["--metric", "vqav2/accuracy"], "or a score of --eval-task T as T/<score>"),
    (["--eval-task", "vqav2"], "eval_data must be given together with --eval-task"),
    (["--eval-task", "vqav2", "--eval-data", "/nowhere"], "--eval-data /nowhere: no such directory"),
    (["--eval-task", "gqa", "--eval-data", "/x", "--metric", "gqa/CIDEr"], "val_loss | cider | qa_accuracy | gqa/"),
    (["--eval-prompt", "{}"], "eval_prompt must be given with --eval-task, got '{}'"),
    (["--eval-limit", "5"], "eval_limit must be a positive number, given with --eval-task, got 5"),
    (["--eval-task", "vqav2", "--eval-data", "BENCHMARK", "--eval-prompt", "{nope}"],
     "--eval-prompt '{nope}': this task's prompts can use {question}"),
])
def test_transfer_refuses_bad_eval_settings(tiny_defaults, benchmarks, tmp_path, arguments, message):
    from vlfast.transfer.__main__ import main as transfer

    arguments = [str(benchmarks["vqav2"]) if a == "BENCHMARK" else a for a in arguments]
    with pytest.raises(SystemExit, match=re.escape(message)):
        transfer(["--preset", "smoke", "--output-dir", str(tmp_path / "run"), *arguments])


def test_transfer_refuses_an_empty_prompt_for_a_tokenizer_without_bos(tiny_defaults, benchmarks, tmp_path):
    """Caught before training, not at the first scoring after an epoch."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from vlfast.transfer.__main__ import main as transfer

    tokenizer = defaults.shapes_tokenizer()
    tokenizer.bos_token = None
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=40, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    with pytest.raises(SystemExit, match=re.escape("--eval-prompt '': an empty prompt, and the tokenizer of "
                                                   "--target-llm has no bos token")):
        transfer(["--preset", "smoke", "--target-llm", str(tmp_path / "llm"), "--eval-task", "coco_caption",
                  "--eval-data", str(benchmarks["coco_caption"]), "--eval-prompt", "",
                  "--output-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run" / "source").exists()


def test_transfer_under_torchrun_splits_the_benchmark_and_scores_it_whole(tiny_defaults, benchmarks, tmp_path):
    """Each of two processes answers half the questions; the gathered predictions of the last
    validation are those `vlfast.evaluate` gives the saved model in one process."""
    from tests.transfer.conftest import run_cli

    done = run_cli(tiny_defaults, "--preset", "smoke", "--no-baseline", "--eval-task", "gqa", "--eval-data",
                   str(benchmarks["gqa"]), "--eval-prompt", "{}", "--eval-limit", "13",
                   "--output-dir", str(tmp_path / "run"), nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    scored = json.loads((tmp_path / "run" / "transfer" / "eval" / "epoch-2" / "scores.json").read_text())
    assert scored["processes"] == 2 and scored["scores"]["questions"] == 13
    alone = evaluate(tmp_path / "run", "gqa", benchmarks["gqa"], tmp_path / "alone", "--limit", "13",
                     "--batch-size", "16")
    assert alone["scores"] == scored["scores"]
    assert ((tmp_path / "alone" / alone["predictions"]).read_text()
            == (tmp_path / "run" / "transfer" / "eval" / "epoch-2" / scored["predictions"]).read_text())


def test_an_exported_blip2_directory_answers_as_the_run(models, benchmarks, tmp_path):
    from vlfast.export.__main__ import main as export

    export([str(models["trained"]), str(tmp_path / "blip2")])
    files = {}
    for name, model in (("run", models["trained"]), ("blip2", tmp_path / "blip2")):
        result = evaluate(model, "gqa", benchmarks["gqa"], tmp_path / name, "--limit", "13", "--num-beams", "2")
        files[name] = (tmp_path / name / result["predictions"]).read_text()
    assert files["blip2"] == files["run"]


def test_scoring_a_file_needs_no_images(benchmarks, tmp_path):
    import shutil

    data = tmp_path / "vqav2"
    shutil.copytree(benchmarks["vqav2"], data, ignore=shutil.ignore_patterns("*.jpg"))
    annotations = json.loads((data / "v2_mscoco_val2014_annotations.json").read_text())["annotations"]
    right = tmp_path / "right.json"
    right.write_text(json.dumps([{"question_id": a["question_id"], "answer": a["multiple_choice_answer"]}
                                 for a in annotations]))
    scored = main(["--predictions", str(right), "--task", "vqav2", "--data", str(data), "--output-dir",
                   str(tmp_path / "out")])
    assert scored["scores"]["accuracy"] == 100.0


def test_scienceqa_mini_splits_read_images_from_the_problems_split(benchmarks, tmp_path):
    import shutil

    from vlfast.evaluate.tasks import TASKS, load_benchmark

    data = tmp_path / "scienceqa"
    shutil.copytree(benchmarks["scienceqa"], data)
    splits = json.loads((data / "pid_splits.json").read_text())
    (data / "pid_splits.json").write_text(json.dumps({**splits, "minitest": splits["test"][:3]}))
    _, benchmark = load_benchmark(TASKS["scienceqa"], data, "minitest")
    assert [s.image.parent.parent.name for s in benchmark.samples] == ["test"] * 3
