"""python -m vlfast.costmodel [--source LLM] [--target LLM]: projected GPU-hours of training a VPG for
the target LLM from scratch and with VPGTrans from the source, then with vlfast's changes."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from vlfast.costmodel.kernels import A100, H100
from vlfast.costmodel.training import LLMS, PAPER, UTILISATION, markdown, transfer_lines

GPUS = {"a100": A100, "h100": H100}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vlfast.costmodel", description=__doc__)
    names = ", ".join(LLMS)
    parser.add_argument("--source", default=PAPER["pair"][0], help=f"{names}, or a local HF model dir / config.json")
    parser.add_argument("--target", default=PAPER["pair"][1], help="as --source")
    parser.add_argument("--gpu", choices=GPUS, default="a100")
    parser.add_argument("--utilisation", type=float, default=UTILISATION, help="share of the dense bf16 rate")
    parser.add_argument("--scratch-samples", type=float, default=PAPER["scratch_samples"],
                        help="image-text pairs seen from scratch (default: the paper's)")
    parser.add_argument("--transfer-samples", type=float, default=PAPER["transfer_samples"],
                        help="image-text pairs seen by VPGTrans (default: the paper's, 10.7%% of scratch)")
    parser.add_argument("--text-tokens", type=int, default=32, help="padded caption length")
    parser.add_argument("--json", action="store_true", help="print the lines as JSON instead of a table")
    args = parser.parse_args(argv)
    if not 0 < args.utilisation <= 1:
        parser.error(f"--utilisation must be in (0, 1], got {args.utilisation}")
    for name in ("scratch_samples", "transfer_samples", "text_tokens"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    gpu = GPUS[args.gpu]
    try:
        lines = transfer_lines(args.source, args.target, gpu=gpu, utilisation=args.utilisation,
                               scratch_samples=args.scratch_samples, transfer_samples=args.transfer_samples,
                               text_tokens=args.text_tokens)
    except (ValueError, OSError) as error:
        sys.exit(f"python -m vlfast.costmodel: {error}")
    if args.json:
        print(json.dumps([asdict(ln) for ln in lines], indent=1))
        return
    print(f"VPG for {args.target}, transferred from {args.source} (all figures projected unless 'reported')\n")
    print(markdown(lines, gpu, args.utilisation))


if __name__ == "__main__":
    main()
