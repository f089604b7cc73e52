"""`python -m vlfast.evaluate --model DIR --task TASK --data DIR`: a model's zero-shot scores on a
benchmark, from the benchmark's official files, with its official metric.

Writes the predictions in the benchmark's submission format, scores.json and scores.md to
--output-dir, and prints the scores. `--predictions FILE` scores a file in that format (from vlfast,
LAVIS, Hugging Face, ...) with the same code, without a model. Under `torchrun --nproc_per_node=N`
each process generates for every N-th sample and the main process scores them all.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vlfast.evaluate.tasks import TASKS, get_task, load_benchmark


def parser() -> argparse.ArgumentParser:
    tasks = "; ".join(f"{t.name}: {t.files}" for t in TASKS.values())
    parser = argparse.ArgumentParser(prog="python -m vlfast.evaluate", description=__doc__.splitlines()[0],
                                     epilog=f"--data holds, per task: {tasks}")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a vlfast.transfer run directory, a vlfast model directory or a BLIP-2 one")
    source.add_argument("--predictions", help="score this predictions file (the benchmark's format) instead")
    parser.add_argument("--task", required=True, choices=list(TASKS))
    parser.add_argument("--data", required=True, help="the folder of the benchmark's files (see below)")
    parser.add_argument("--split", help="default: " + ", ".join(f"{t.name} {t.splits[0]}" for t in TASKS.values()))
    parser.add_argument("--image-dir", help="where the images are, if not where --data's layout puts them")
    parser.add_argument("--limit", type=int, help="only the first N questions (or images)")
    parser.add_argument("--output-dir", help="default: eval/<task>-<split>")
    generation = parser.add_argument_group("generation (defaults: BLIP-2's settings for the task in LAVIS)")
    generation.add_argument("--prompt", help="template: '{}' (or '{question}') is the question; ScienceQA also has "
                                             "{context} and {options}; e.g. 'Question: {} Answer:'")
    generation.add_argument("--num-beams", type=int)
    generation.add_argument("--max-new-tokens", type=int)
    generation.add_argument("--min-new-tokens", type=int)
    generation.add_argument("--length-penalty", type=float)
    generation.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--vqa-rule", choices=("official", "lavis"), default=None,
                        help="VQAv2 / OK-VQA accuracy: the official evaluation code's (default) or LAVIS's copy")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader processes decoding images (default: 2)")
    parser.add_argument("--run", default="transfer", help="which run of a run directory (default: transfer)")
    parser.add_argument("--device", default="auto", help="auto (cuda when there is one), cpu, cuda or cuda:N")
    return parser


def main(argv: list[str] | None = None) -> dict:
    """Prints the scores; returns scores.json's content (on the main process)."""
    from vlfast.evaluate.run import (
        Generation,
        check_prompt,
        evaluate_model,
        generation_details,
        score,
        write_results,
    )

    cli = parser()
    args = cli.parse_args(argv)
    for name in ("limit", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            cli.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.workers < 0:
        cli.error(f"--workers must be 0 or more, got {args.workers}")
    task = get_task(args.task)
    if args.vqa_rule and not task.rules:
        cli.error(f"--vqa-rule applies to vqav2 and okvqa, not {task.name}")
    rule = args.vqa_rule or (task.rules[0] if task.rules else None)
    processes, finished = None, False
    try:
        split, benchmark = load_benchmark(task, args.data, args.split, args.image_dir, args.limit,
                                          check_images=not args.predictions)  # scoring a file needs no image
        output_dir = Path(args.output_dir or f"eval/{task.name}-{split}")
        details = {"data": str(Path(args.data).resolve()), "limit": args.limit, "rule": rule}
        if args.predictions:
            predictions = task.read(Path(args.predictions))
            if args.limit:  # what lies past the limit is not scored
                kept = {s.id for s in benchmark.samples}
                predictions = {k: v for k, v in predictions.items() if k in kept}
            scores = score(task, benchmark, predictions, args.predictions, rule)
            details["scored_file"] = str(Path(args.predictions).resolve())
        else:
            generation = Generation.for_task(task, prompt=args.prompt, num_beams=args.num_beams,
                                             max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                                             length_penalty=args.length_penalty,
                                             repetition_penalty=args.repetition_penalty)
            check_prompt(generation.prompt, benchmark.samples)
            from vlfast.export.load import load_model
            from vlfast.training import distributed

            processes = distributed.start(args.device)
            model = load_model(args.model, args.run).to(processes.device)
            predictions, scores, seconds = evaluate_model(
                model, task, benchmark, generation, batch_size=args.batch_size, workers=args.workers, rule=rule,
                rank=processes.rank, world=processes.world)
            details |= {"model": str(Path(args.model).resolve()), "processes": processes.world,
                        "generation_s": round(seconds, 1), **generation_details(generation)}
            finished = True
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"vlfast.evaluate: error: {error}")
    finally:
        if processes is not None:
            distributed.stop(finished)
    if processes is not None and not processes.main:
        return {}
    written = write_results(output_dir, task, split, predictions, scores, details)
    print(json.dumps(scores, indent=1))
    print(f"\n{task.title} {split}: predictions {written}, scores {output_dir}/scores.json and scores.md")
    return json.loads((output_dir / "scores.json").read_text())


if __name__ == "__main__":
    main()
