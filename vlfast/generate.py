"""`python -m vlfast.generate --model DIR --image a.jpg [b.jpg ...]`: one answer per image, printed as
`a.jpg: <text>`.

DIR: a `python -m vlfast.transfer` run directory (its transfer model unless --run says otherwise),
a vlfast model directory, or a Hugging Face BLIP-2 directory (an export of vlfast's, or Salesforce's).
Images are read with PIL as RGB, resized bicubic to the vision tower's size and CLIP-normalised, as
vlfast trains on them; the prompt is read as in training (CaptionCollator.prefix_ids). Beam search
over 5 beams by default, BLIP-2's setting; --do-sample samples instead.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from vlfast.data.coco import image_to_tensor
from vlfast.data.collate import CaptionCollator
from vlfast.export.load import RUNS, load_model
from vlfast.models import VisionLanguageModel
from vlfast.transfer.experiment import TRANSFER


def read_images(paths: list[str]) -> list[Image.Image]:
    """The images as RGB; FileNotFoundError or ValueError naming the first file that is missing or unreadable."""
    images = []
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--image {path}: no such file")
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"--image {path}: not an image PIL can read ({error})") from error
    return images


@torch.no_grad()
def answer(model: VisionLanguageModel, images: list[Image.Image], prompt: str = "", *, max_new_tokens: int = 30,
           **generate_kwargs) -> list[str]:
    """One text per image, generated after `prompt` (num_beams, do_sample, temperature, ... go to
    generate); the prompt is not part of it."""
    if model.vision_tower is None:
        raise ValueError("this model has no vision tower: it cannot read images")
    tokenizer = model.tokenizer
    collate = CaptionCollator.for_llm(tokenizer, model.llm)
    prefix = collate.prefix_ids(prompt)
    if not prefix:
        raise ValueError("the tokenizer has no bos token to start from: pass a prompt")
    device = next(model.vpg.parameters()).device
    pixels = torch.stack([image_to_tensor(image, model.vision_tower.config.image_size) for image in images])
    out = model.generate(torch.tensor([prefix] * len(images), device=device), pixel_values=pixels.to(device),
                         max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **generate_kwargs)
    return [collate.decode(ids) for ids in out.tolist()]


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vlfast.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True,
                        help="a vlfast.transfer run directory, a vlfast model directory or a BLIP-2 one")
    parser.add_argument("--image", nargs="+", required=True, help="image files")
    parser.add_argument("--prompt", default="", help='e.g. "Question: what is on the table? Answer:" (default: none)')
    decoding = parser.add_mutually_exclusive_group()
    decoding.add_argument("--num-beams", type=int, default=5, help="beam search width (default: 5)")
    decoding.add_argument("--do-sample", action="store_true", help="sample instead of beam search")
    parser.add_argument("--temperature", type=float, default=1.0, help="with --do-sample (default: 1.0)")
    parser.add_argument("--max-new-tokens", type=int, default=30, help="default: 30")
    parser.add_argument("--run", choices=RUNS, default=TRANSFER,
                        help="which run of a run directory (default: transfer)")
    parser.add_argument("--device", default="auto", help="auto (cuda when there is one), cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=0, help="for --do-sample (default: 0)")
    return parser


def main(argv: list[str] | None = None) -> list[str]:
    """Prints and returns one answer per image."""
    cli = parser()
    args = cli.parse_args(argv)
    if args.device not in ("auto", "cpu") and not args.device.startswith("cuda"):
        cli.error(f"--device must be auto, cpu, cuda or cuda:N, got {args.device!r}")
    if args.temperature != 1.0 and not args.do_sample:
        cli.error("--temperature applies to sampling: add --do-sample")
    decoding = ({"do_sample": True, "temperature": args.temperature, "num_beams": 1} if args.do_sample
                else {"num_beams": args.num_beams, "do_sample": False})
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        images = read_images(args.image)  # a bad image fails before the model loads
        model = load_model(args.model, args.run).to(device)
        torch.manual_seed(args.seed)
        texts = answer(model, images, args.prompt, max_new_tokens=args.max_new_tokens, **decoding)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"vlfast.generate: error: {error}")
    for path, text in zip(args.image, texts, strict=True):
        print(f"{path}: {text}")
    return texts


if __name__ == "__main__":
    main()
