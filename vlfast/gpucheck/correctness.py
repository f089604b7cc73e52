"""Each backend of an op against the float64 oracle, per dtype, with the tests' tolerance rule
(vlfast.ops.tolerance), outputs poisoned with NaN before the kernels run."""
from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from vlfast.gpucheck.cases import Case, Inputs, OpCheck
from vlfast.kernels.utils import poisoned_outputs
from vlfast.ops import BackendUnsupportedError
from vlfast.ops.tolerance import compare, forward_backward, plain_forward_backward

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rows(tensors: list[torch.Tensor], rows: tuple[int, ...]) -> list[torch.Tensor]:
    """The inputs restricted to some rows of x (dim 1), the other inputs whole."""
    index = torch.tensor(rows, device=tensors[0].device)
    return [tensors[0].index_select(1, index), *tensors[1:]]


def check_case(op: OpCheck, case: Case, inputs: Inputs, dtype: torch.dtype, backends: list[str],
               device: torch.device) -> Iterator[dict]:
    """One record per backend: status ok | fail | refused | error, and every compared tensor."""
    rounded = [t.to(dtype) for t in inputs.tensors]
    ref_inputs = [t.double() for t in (_rows(rounded, case.rows) if case.rows else rounded)]
    dout = None if inputs.dout is None else inputs.dout.to(dtype).double()
    ref_out, ref_grads = forward_backward(op.oracle(inputs), ref_inputs, dout, torch.float64)
    plain_out, plain_grads = plain_forward_backward(op.oracle(inputs), ref_inputs, dout, dtype,
                                                    dtype in inputs.fp32_plain)
    for backend in backends:
        record = {"op": op.name, "case": case.name, "label": case.label, "dtype": str(dtype).removeprefix("torch."),
                  "backend": backend, "checked": "forward, rows " + str(list(case.rows)) if case.rows
                  else "forward + backward"}
        start = time.perf_counter()
        try:
            with poisoned_outputs():
                kernel_inputs = rounded if case.rows else ref_inputs
                out, grads = forward_backward(op.kernel(inputs, backend), kernel_inputs, dout, dtype)
                _synchronize(device)
        except BackendUnsupportedError as refusal:
            yield {**record, "status": "refused", "reason": str(refusal)}
            continue
        except Exception as error:  # a crash is a finding: record it and go on where the device still works
            yield {**record, "status": "error", "reason": f"{type(error).__name__}: {error}"[:2000]}
            _synchronize(device)  # raises when the CUDA context is lost: the caller stops this op
            continue
        if case.rows:
            out = out.index_select(1, torch.tensor(case.rows, device=out.device))
        comparisons = [compare("out", out, ref_out, plain_out, factor=2)]
        if dout is not None:
            comparisons += [compare(name, got, ref, plain, factor=3) for name, got, ref, plain
                            in zip(op.grad_names, grads, ref_grads, plain_grads, strict=True)]
        ok = all(c.ok for c in comparisons) and out.dtype == dtype
        yield {**record, "status": "ok" if ok else "fail", "seconds": time.perf_counter() - start,
               "comparisons": [c.as_dict() for c in comparisons]}


def check_op(op: OpCheck, cases: list[Case], dtypes: list[torch.dtype], backends: list[str],
             device: torch.device, deadline: float = float("inf"), first: int = 0) -> Iterator[dict]:
    """Records of cases[first:], each with its case_index (a restarted check continues after the
    last case recorded)."""
    for number in range(first, len(cases)):
        case = cases[number]
        head = {"op": op.name, "case": case.name, "label": case.label, "case_index": number}
        if time.monotonic() > deadline:
            yield {**head, "status": "skipped", "reason": "the check's time budget was spent"}
            continue
        gen = torch.Generator(device).manual_seed(number)
        try:
            inputs = op.make(case, gen)
        except torch.OutOfMemoryError as error:
            yield {**head, "status": "skipped", "reason": f"inputs do not fit on the device: {error}"[:500]}
            continue
        for dtype in dtypes:
            for record in check_case(op, case, inputs, dtype, backends, device):
                yield {**record, "case_index": number}
        del inputs
        if device.type == "cuda":
            torch.cuda.empty_cache()
