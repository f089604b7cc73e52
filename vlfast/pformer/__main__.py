"""`python -m vlfast.pformer train`: a P-Former trained on text alone for a frozen LLM (the embedded
default's target LM and the shapes captions unless told otherwise). Its output directory is what
`python -m vlfast.transfer --pformer DIR` takes."""
from __future__ import annotations

import argparse
import sys

from vlfast.pformer.train import PFormerTrainConfig, train
from vlfast.settings import add_fields, config_to_run
from vlfast.training import Interrupted


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m vlfast.pformer", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train_parser = commands.add_parser("train", help="train a P-Former on captions (text only)")
    train_parser.add_argument("--resume", action="store_true", help="continue the run in --output-dir")
    add_fields(train_parser, PFormerTrainConfig)
    arguments = vars(parser.parse_args(argv))
    resume = arguments.pop("resume")
    arguments.pop("command")
    try:
        config = config_to_run(PFormerTrainConfig, {k: v for k, v in arguments.items() if v is not None}, resume)
        history = train(config)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        sys.exit(f"vlfast.pformer: error: {error}")
    except Interrupted as interruption:
        print(f"\n{interruption}\ncontinue with: python -m vlfast.pformer train --resume --output-dir "
              f"{config.output_dir} (and the same settings)", file=sys.stderr)
        sys.exit(128 + interruption.signum)
    for row in history:
        print("  ".join(f"{k} {v}" for k, v in row.items()))
    print(f"\nP-Former: {config.output_dir}/pformer (use with python -m vlfast.transfer --pformer {config.output_dir})")
    return history


if __name__ == "__main__":
    main()
