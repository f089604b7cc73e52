"""`python -m vlfast.transfer`: VPGTrans on the embedded default (no arguments needed)."""
from __future__ import annotations

import argparse
import dataclasses

from vlfast.transfer.run import TransferConfig, run, table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    defaults = TransferConfig()
    for field in dataclasses.fields(TransferConfig):
        name = "--" + field.name.replace("_", "-")
        if field.type in ("bool", bool):
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=getattr(defaults, field.name))
        else:
            kind = {"int": int, "float": float, "str": str}[str(field.type)]
            parser.add_argument(name, type=kind, default=getattr(defaults, field.name))
    parser.add_argument("--preset", choices=["smoke"], help="smoke: a seconds-long run for tests")
    args = vars(parser.parse_args(argv))
    preset = args.pop("preset")
    config = TransferConfig(**args)
    if preset == "smoke":
        smoke = TransferConfig.smoke()
        config = dataclasses.replace(smoke, output_dir=config.output_dir, seed=config.seed, baseline=config.baseline)
    report = run(config)
    print(table(report))
    print(f"\nreport: {config.output_dir}/report.json ({report['total_s']} s in all)")


if __name__ == "__main__":
    main()
