"""`python -m vlfast.gpucheck --output DIR`: run every GPU backend against the float64 reference and
time it against eager, SDPA and torch.compile, within a time budget; writes DIR/gpucheck.json and
DIR/gpucheck.md.

Each part runs in its own process (a kernel that corrupts the CUDA context loses only its part) and
appends its records to a JSON-lines file as it goes, so a part stopped at its time limit keeps what
it measured. Parts: correctness of each op, timings, and the correctness of the small cases under
compute-sanitizer's memcheck where that tool exists.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import torch

from vlfast.gpucheck.report import write_report

OPS = ("cross_attention", "memvp_memory", "routed_adapter")
GPU_BACKENDS = ["triton", "cuda"]
# Shares of the budget: correctness (all ops at once), then timings; the sanitizer gets what is left.
CORRECTNESS_SHARE, TIMING_SHARE = 0.5, 0.3


def _run_part(args: argparse.Namespace) -> None:
    """In a child process: one part, its records appended to args.records as JSON lines."""
    kind, _, op = args.part.partition(":")
    device = torch.device(args.device)
    deadline = time.monotonic() + args.seconds
    with open(args.records, "a", encoding="utf-8") as out:
        def emit(record: dict) -> None:
            out.write(json.dumps({"part": kind, **record}) + "\n")
            out.flush()

        if kind == "correctness":
            from vlfast.gpucheck.cases import OPS as CHECKS
            from vlfast.gpucheck.correctness import DTYPES, check_op

            check = CHECKS[op]
            cases = [c for c in check.cases if c.label == "awkward"] if args.quick else check.cases
            dtypes = [DTYPES[d] for d in args.dtypes]
            try:
                for record in check_op(check, cases, dtypes, args.backends, device, deadline, args.first):
                    emit(record)
            except Exception as error:  # the CUDA context is gone: the rest of this op cannot run
                emit({"op": op, "status": "error", "case": "(remaining cases)",
                      "reason": f"stopped: {type(error).__name__}: {error}"[:2000]})
                raise
        elif kind == "hardware":
            from vlfast.gpucheck.timing import measure_hardware

            emit({"hardware": measure_hardware(device)})
        elif kind == "timing":
            from vlfast.gpucheck.correctness import DTYPES
            from vlfast.gpucheck.timing import hardware, time_op

            hw = hardware(json.loads(args.hardware))
            for name in args.ops:
                for dtype in args.dtypes:
                    compile_eager = args.compile and dtype == "bfloat16"  # compiling is slow: the training dtype
                    for record in time_op(name, DTYPES[dtype], device, hw, compile_eager, deadline):
                        emit(record)


def _command(part: str, records: Path, seconds: float, args: argparse.Namespace, extra: list[str]) -> list[str]:
    command = [sys.executable, "-m", "vlfast.gpucheck", "--part", part, "--records", str(records),
               "--seconds", str(seconds), "--device", args.device, "--dtypes", *args.dtypes,
               "--backends", *args.backends, "--ops", *args.ops, *extra]
    return command if args.compile else [*command, "--no-compile"]


def _start(command: list[str]) -> subprocess.Popen:
    """The child's output goes to a temporary file (a pipe nobody reads until the end could fill up
    and stall it)."""
    log = tempfile.TemporaryFile("w+", encoding="utf-8")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
    process.log = log
    return process


def _finish(part: str, process: subprocess.Popen, started: float, limit: float) -> dict:
    try:
        process.wait(timeout=max(1.0, limit - (time.monotonic() - started)))
        killed = ""
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        killed = f"\nkilled after {limit:.0f} s"
    process.log.seek(0)
    output = process.log.read() + killed
    process.log.close()
    seconds = time.monotonic() - started
    print(f"gpucheck: {part} done in {seconds:.0f} s (exit {process.returncode})", flush=True)
    return {"part": part, "returncode": process.returncode, "seconds": seconds, "output_tail": output[-3000:]}


def _run(part: str, records: Path, seconds: float, args: argparse.Namespace, extra: list[str] = (),
         prefix: list[str] = ()) -> dict:
    print(f"gpucheck: {part} ({seconds:.0f} s budget)", flush=True)
    process = _start([*prefix, *_command(part, records, seconds, args, list(extra))])
    return _finish(part, process, time.monotonic(), seconds + 90)


def _correctness(args: argparse.Namespace, seconds: float) -> list[dict]:
    """Every op's correctness part at once (compiling kernels is CPU work, the GPU is large), each
    restarted after the last recorded case when it dies (a kernel that breaks the CUDA context)."""
    deadline = time.monotonic() + seconds
    quick = ["--quick"] if args.quick else []
    running: dict[str, tuple[subprocess.Popen, float, int]] = {}
    parts = []

    def start(op: str, first: int) -> None:
        left = deadline - time.monotonic()
        command = _command(f"correctness:{op}", _records_file(args.output, op), left, args,
                           [*quick, "--first", str(first)])
        print(f"gpucheck: correctness:{op} from case {first} ({left:.0f} s budget)", flush=True)
        running[op] = (_start(command), time.monotonic(), first)

    for op in args.ops:
        start(op, 0)
    while running:
        time.sleep(1)
        for op, (process, started, first) in list(running.items()):
            if process.poll() is None and time.monotonic() < deadline + 90:
                continue
            del running[op]
            parts.append(_finish(f"correctness:{op}", process, started, deadline + 90 - started))
            if process.returncode != 0 and time.monotonic() < deadline - 20:
                done = [r["case_index"] for r in _read(_records_file(args.output, op)) if "case_index" in r]
                # Continue after the last recorded case; a case that killed the process before any
                # record of it is skipped.
                start(op, max(max(done, default=-1) + 1, first + 1))
    return parts


def _records_file(output: Path, part: str) -> Path:
    return output / f"records-{part}.jsonl"


def _environment() -> dict:
    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    from vlfast.info import report

    root = Path(__file__).resolve().parents[2]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=root)
    changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                             cwd=root).stdout.splitlines()
    smi = shutil.which("nvidia-smi")
    driver = subprocess.run([smi, "--query-gpu=driver_version,name", "--format=csv,noheader"], capture_output=True,
                            text=True).stdout.strip() if smi else ""
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": version("triton"), "driver": driver, "commit": commit.stdout.strip(),
            "files_changed_since_commit": [line[3:] for line in changed],
            "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", ""), "vlfast_info": report()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vlfast.gpucheck", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("gpucheck"), help="folder for gpucheck.json / .md")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for the whole check (default 420)")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--dtypes", nargs="+", choices=("float32", "float16", "bfloat16"),
                        default=["float16", "bfloat16", "float32"])
    parser.add_argument("--backends", nargs="+", default=GPU_BACKENDS)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="the awkward small shapes only")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile timings")
    parser.add_argument("--no-sanitizer", dest="sanitizer", action="store_false")
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--records", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--hardware", help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part:
        _run_part(args)
        return
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("TRITON_INTERPRET=1 is set: unset it, the check is of the compiled kernels")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: the GPU check needs one (`pytest tests/gpu` skips here for the same reason)")
    args.output.mkdir(parents=True, exist_ok=True)
    for stale in args.output.glob("records-*.jsonl"):
        stale.unlink()
    start = time.monotonic()
    parts = _correctness(args, args.budget * CORRECTNESS_SHARE)
    if args.device.startswith("cuda"):
        parts.append(_run("hardware", _records_file(args.output, "timing"), 60, args))
        hardware = next((r["hardware"] for r in _read(_records_file(args.output, "timing")) if "hardware" in r), None)
        if hardware is not None:
            parts.append(_run("timing", _records_file(args.output, "timing"), args.budget * TIMING_SHARE, args,
                              extra=["--hardware", json.dumps(hardware)]))
        sanitizer = shutil.which("compute-sanitizer")
        left = args.budget - (time.monotonic() - start)
        if args.sanitizer and sanitizer and left > 30:
            for op in args.ops:
                part = _run(f"correctness:{op}", _records_file(args.output, "memcheck"), left / len(args.ops), args,
                            extra=["--quick"], prefix=[sanitizer, "--tool", "memcheck", "--error-exitcode", "99"])
                parts.append({**part, "part": f"memcheck {op}"})
    records = [r for path in sorted(args.output.glob("records-*.jsonl")) for r in _read(path)
               if path.stem != "records-memcheck"]
    memcheck = _read(_records_file(args.output, "memcheck"))
    summary = {"environment": _environment(), "budget_s": args.budget, "seconds": time.monotonic() - start,
               "parts": parts, "records": records, "memcheck_records": memcheck}
    (args.output / "gpucheck.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    write_report(summary, args.output / "gpucheck.md")
    print(f"gpucheck: wrote {args.output / 'gpucheck.json'} and {args.output / 'gpucheck.md'}")


def _read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


if __name__ == "__main__":
    main()
