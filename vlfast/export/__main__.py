"""`python -m vlfast.export SOURCE OUT`: a trained model as a Hugging Face BLIP-2 directory
(Blip2ForConditionalGeneration + Blip2Processor), or with `--format vlfast` as a vlfast model
directory (VisionLanguageModel.save_pretrained: any connector, MMA adapters included).

SOURCE: a `python -m vlfast.transfer` run directory (its transfer model unless --run says
otherwise), a vlfast model directory, or a Hugging Face BLIP-2 directory.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from vlfast.export.blip2 import to_hf_blip2
from vlfast.export.load import RUNS, load_model
from vlfast.transfer.experiment import TRANSFER


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vlfast.export", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a vlfast.transfer run directory, a vlfast model directory or a BLIP-2 one")
    parser.add_argument("out", help="the directory to write")
    parser.add_argument("--run", choices=RUNS, default=TRANSFER,
                        help="which run of a run directory (default: transfer)")
    parser.add_argument("--format", choices=("hf", "vlfast"), default="hf",
                        help="hf: Hugging Face BLIP-2 (input connector without adapters only); vlfast: a vlfast "
                             "model directory (default: hf)")
    parser.add_argument("--copy-frozen", action="store_true",
                        help="--format vlfast: copy the frozen LLM and vision tower into OUT instead of referring "
                             "to them")
    return parser


def main(argv: list[str] | None = None) -> Path:
    args = parser().parse_args(argv)
    try:
        model = load_model(args.source, args.run)
        if args.format == "vlfast":
            model.save_pretrained(args.out, copy_frozen=args.copy_frozen)
        else:
            with warnings.catch_warnings(record=True) as caught:  # the ln_vision eps: said as the command's own
                warnings.simplefilter("always")
                to_hf_blip2(model, args.out)
            for warning in caught:
                print(f"vlfast.export: warning: {warning.message}", file=sys.stderr)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"vlfast.export: error: {error}")
    written = {"hf": "Hugging Face BLIP-2 (Blip2ForConditionalGeneration + Blip2Processor)",
               "vlfast": "vlfast model directory (VisionLanguageModel.from_pretrained)"}
    print(f"{args.out}: {written[args.format]}")
    return Path(args.out)


if __name__ == "__main__":
    main()
