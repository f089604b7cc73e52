"""`python -m vlfast.transfer`: VPGTrans on the embedded default (no arguments needed).

Also `torchrun --nproc_per_node=N -m vlfast.transfer ...` for data-parallel training (with `--fsdp`,
the frozen LLM and the VPG sharded over the processes rather than copied to each), `--config
FILE.yaml` for settings, and `--resume` to continue an interrupted run.
"""
from __future__ import annotations

import sys
from pathlib import Path

from vlfast.settings import config_to_run, save_config
from vlfast.training import Interrupted, StopSignals, distributed
from vlfast.transfer import experiment
from vlfast.transfer.config import TransferConfig, given_values, parser
from vlfast.transfer.report import table


def main(argv: list[str] | None = None) -> dict:
    arguments = parser(__doc__.splitlines()[0]).parse_args(argv)
    try:
        config = config_to_run(TransferConfig, given_values(arguments), arguments.resume,
                               machine=("device", "grad_checkpointing", "fsdp"))  # none changes the numbers
        out = Path(config.output_dir)
        processes = distributed.start(config.device)
        parts = experiment.prepare(config, processes.world)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        sys.exit(f"vlfast.transfer: error: {error}")
    finished = False
    try:
        if processes.main:
            out.mkdir(parents=True, exist_ok=True)
            save_config(config, out)
        with StopSignals() as signals:
            summary = experiment.run(config, parts, processes, signals)
        finished = True
    except Interrupted as interruption:
        if processes.main:
            print(f"\n{interruption}\ncontinue with: python -m vlfast.transfer --resume --output-dir {out}",
                  file=sys.stderr)
        sys.exit(128 + interruption.signum)
    finally:
        distributed.stop(finished)
    if processes.main:
        print(table(summary))
        print(f"\nreport: {out}/report.json, report.md, curves.png ({summary['total_s']} s in all)")
    return summary


if __name__ == "__main__":
    main()
