"""The inputs each op is checked on: awkward shapes (the CPU tests' own), the shapes the models use,
and the sizes at the kernels' limits. Each op knows how to make its inputs, its float64 oracle (the
textbook formula differentiated by autograd) and how to call one of its backends."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from vlfast.ops import cross_attention, memvp_memory, routed_adapter
from vlfast.ops.reference import (
    cross_attention_autograd,
    dropout_keep_mask,
    memvp_memory_autograd,
    routed_adapter_autograd,
)
from vlfast.ops.tolerance import seed_of

DROPOUT_SEED = 7  # the generator seed of every dropout case: each backend must draw the mask of this seed


@dataclass(frozen=True)
class Case:
    """One input of one op. `rows`: forward only, checked on these rows of x (cases too large for a
    float64 reference of the whole output; the ops are row-independent given the other inputs)."""

    op: str
    dims: dict[str, int]
    label: str
    # "mask" (cross_attention, a fully masked sample included), "dropout", or (memvp_memory) "large
    # activation" / "large dpre": fp16 intermediates past 65504, results within fp16's range.
    variant: str = ""
    rows: tuple[int, ...] = ()

    @property
    def name(self) -> str:
        shape = " ".join(f"{k}={v}" for k, v in self.dims.items())
        return f"{shape}{' ' + self.variant if self.variant else ''}"

    @property
    def forward_only(self) -> bool:
        return bool(self.rows)


@dataclass(frozen=True)
class Inputs:
    tensors: list[Tensor]  # float64
    dout: Tensor | None  # float64; None for forward-only cases
    mask: Tensor | None = None  # cross_attention's kv_mask
    keep: Tensor | None = None  # the dropout keep mask the backends must draw
    dropout_p: float = 0.0
    # dtypes whose plain op overflows in its intermediates on these inputs: their yardstick is the
    # op in fp32 rounded to the dtype (vlfast.ops.tolerance.plain_forward_backward).
    fp32_plain: tuple[torch.dtype, ...] = ()


@dataclass(frozen=True)
class OpCheck:
    name: str
    grad_names: tuple[str, ...]
    make: Callable[[Case, torch.Generator], Inputs]  # inputs on the generator's device
    oracle: Callable[[Inputs], Callable[..., Tensor]]
    kernel: Callable[[Inputs, str], Callable[..., Tensor]]
    cases: list[Case] = field(default_factory=list)


def _randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.randn(*shape, generator=gen, dtype=dtype, device=gen.device)


def _keep(shape: tuple[int, ...], p: float, device: torch.device) -> Tensor | None:
    return dropout_keep_mask(seed_of(DROPOUT_SEED), shape, p, device) if p else None


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(DROPOUT_SEED)


# --- cross_attention -------------------------------------------------------------------------------

def _attention_inputs(case: Case, gen: torch.Generator) -> Inputs:
    d = case.dims
    b, h, lq, lk, hd = d["B"], d["H"], d["Lq"], d["Lk"], d["D"]
    q, k, v = (_randn(gen, b, h, n, hd) for n in (lq, lk, lk))
    mask = None
    if case.variant == "mask":
        mask = torch.rand(b, lk, generator=gen, device=gen.device) > 0.3
        mask[0, 0] = True
        if b > 1:
            mask[-1] = False  # a sample with no visible key: zeros and zero gradients
    return Inputs([q, k, v], _randn(gen, b, h, lq, hd), mask=mask)


CROSS_ATTENTION = OpCheck(
    "cross_attention", ("dq", "dk", "dv"), _attention_inputs,
    oracle=lambda i: lambda q, k, v: cross_attention_autograd(q, k, v, i.mask),
    kernel=lambda i, backend: lambda q, k, v: cross_attention(q, k, v, i.mask, backend=backend),
)
_ATTENTION_SHAPES = [  # (B, H, Lq, Lk, D, label)
    (2, 3, 32, 257, 64, "awkward"), (1, 2, 1, 1, 32, "awkward"), (2, 1, 17, 33, 48, "awkward"),
    (1, 2, 70, 19, 80, "awkward"), (2, 1, 5, 100, 128, "awkward"), (1, 1, 9, 40, 256, "head dim 256"),
    (32, 12, 32, 257, 64, "Q-Former (BLIP-2), batch 32"), (4, 12, 256, 257, 64, "256 queries"),
    (2, 2, 16, 4097, 64, "long key sequence"),
    (2100, 32, 8, 20, 32, "B*H > 65535 (grid axis limit)"),
]
CROSS_ATTENTION.cases.extend(
    Case("cross_attention", dict(B=b, H=h, Lq=lq, Lk=lk, D=hd), label, variant)
    for b, h, lq, lk, hd, label in _ATTENTION_SHAPES for variant in ("", "mask")
)


# --- memvp_memory -----------------------------------------------------------------------------------

MEMVP_SCALE = 0.7


def _grid(gen: torch.Generator, shape: tuple[int, ...], bound: float, step: float) -> Tensor:
    """Uniform multiples of step (a power of 2) in [-bound, bound], float64."""
    n = round(bound / step)
    return torch.randint(-n, n + 1, shape, generator=gen, device=gen.device).double() * step


def memvp_fp16_overflow_inputs(dims: dict[str, int], large: str, gen: torch.Generator) -> tuple[list[Tensor], Tensor]:
    """(x, z, key_pos, value_pos), dout on which memvp's fp16 intermediates pass 65504 while the
    results (scale 0.7) stay within fp16's range, for B, L <= 40, M <= 200, D <= 32. large="activation":
    x K^T up to ~2e5 with small V and dout; "dpre": dout V^T up to ~1e5 with small x and K. Values lie
    on grids that make x, dout, z + key_pos and z + value_pos exact in fp16, so the only fp16
    roundings left are the ones a kernel cannot avoid."""
    b, length, m, dim = dims["B"], dims["L"], dims["M"], dims["D"]
    if large == "activation":
        x, dout = _grid(gen, (b, length, dim), 4096, 4), _grid(gen, (b, length, dim), 2**-5, 2**-9)
        z, key_pos, value_pos = _grid(gen, (b, m, dim), 2**-5, 2**-7), _grid(gen, (m, dim), 8, 1), \
            _grid(gen, (m, dim), 2**-7, 2**-11)
    else:
        x, dout = _grid(gen, (b, length, dim), 2**-5, 2**-9), _grid(gen, (b, length, dim), 4096, 4)
        z, key_pos, value_pos = _grid(gen, (b, m, dim), 2**-6, 2**-6), _grid(gen, (m, dim), 2**-6, 2**-10), \
            _grid(gen, (m, dim), 16, 2**-6)
    return [x, z, key_pos, value_pos], dout


def _memvp_inputs(case: Case, gen: torch.Generator) -> Inputs:
    d = case.dims
    b, length, m, dim = d["B"], d["L"], d["M"], d["D"]
    if case.variant.startswith("large "):
        tensors, dout = memvp_fp16_overflow_inputs(d, case.variant.removeprefix("large "), gen)
        return Inputs(tensors, dout, fp32_plain=(torch.float16,))
    # MemVP's magnitudes (z scaled by 0.01, positions ~ N(0, 0.02)), large enough for SiLU to bend.
    # x of the forward-only cases is too large for float64: its rows are drawn in fp32.
    x = _randn(gen, b, length, dim, dtype=torch.float32 if case.forward_only else torch.float64)
    tensors = [x, _randn(gen, b, m, dim) / dim**0.5,
               _randn(gen, m, dim) / dim**0.5, _randn(gen, m, dim)]
    p = 0.3 if case.variant == "dropout" else 0.0
    dout = None if case.forward_only else _randn(gen, b, length, dim)
    return Inputs(tensors, dout, keep=_keep((b, length, m), p, gen.device), dropout_p=p)


def _memvp_oracle(i: Inputs):
    return lambda *t: memvp_memory_autograd(*t, scale=MEMVP_SCALE, keep_mask=i.keep, dropout_p=i.dropout_p)


def _memvp_kernel(i: Inputs, backend: str):
    return lambda *t: memvp_memory(*t, scale=MEMVP_SCALE, dropout_p=i.dropout_p, generator=_generator(),
                                   backend=backend)


MEMVP_MEMORY = OpCheck("memvp_memory", ("dx", "dz", "dkey_pos", "dvalue_pos"), _memvp_inputs, _memvp_oracle,
                       _memvp_kernel)
_MEMVP_SHAPES = [  # (B, L, M, D, label)
    (2, 7, 5, 24, "awkward"), (1, 1, 1, 1, "awkward"), (2, 33, 40, 64, "awkward"), (3, 5, 17, 130, "awkward"),
    (1, 19, 320, 48, "LLaMA-7B memory rows"), (2, 128, 320, 4096, "MemVP LLaMA-7B width"),
    (2, 64, 576, 256, "M = 576 (LLaVA-1.5 tokens)"), (1, 32, 2880, 128, "M = 2880 (high resolution)"),
    # Beyond one CUDA memory tile (about 880 rows on an H100, 368 with 99 KiB of shared memory).
    (1, 40, 1152, 4096, "M = 1152, LLaMA-7B width"), (1, 16, 8192, 64, "M = 8192"),
]
MEMVP_MEMORY.cases.extend(
    Case("memvp_memory", dict(B=b, L=length, M=m, D=dim), label, variant)
    for b, length, m, dim, label in _MEMVP_SHAPES for variant in ("", "dropout")
)
MEMVP_MEMORY.cases.extend(
    Case("memvp_memory", dict(B=2, L=33, M=160, D=24), "fp16 intermediates past 65504", variant)
    for variant in ("large activation", "large dpre")
)
# B*L*D > 2^31: int32 element offsets overflow in the last rows.
MEMVP_MEMORY.cases.append(Case("memvp_memory", dict(B=1, L=(2**31 // 4096) + 64, M=16, D=4096),
                               "B*L*D > 2^31 (64-bit offsets)", rows=(0, 1, 2**19 - 1, 2**19, 2**19 + 63)))


# --- routed_adapter ---------------------------------------------------------------------------------

TEMPERATURE, ADAPTER_SCALE = 2.0, 0.8


def _adapter_inputs(case: Case, gen: torch.Generator) -> Inputs:
    d = case.dims
    b, length, dim, e, r = d["B"], d["L"], d["D"], d["E"], d["R"]
    x = _randn(gen, b, length, dim, dtype=torch.float32 if case.forward_only else torch.float64)
    tensors = [x, _randn(gen, b, dim),
               _randn(gen, e, dim) / dim**0.5, _randn(gen, e),
               _randn(gen, r, dim) / dim**0.5, _randn(gen, r) * 0.1,
               _randn(gen, e, dim, r) / r**0.5, _randn(gen, e, dim) * 0.1]
    p = 0.25 if case.variant == "dropout" else 0.0
    dout = None if case.forward_only else _randn(gen, b, length, dim)
    return Inputs(tensors, dout, keep=_keep((b, length, r), p, gen.device), dropout_p=p)


def _adapter_oracle(i: Inputs):
    return lambda *t: routed_adapter_autograd(*t, temperature=TEMPERATURE, scale=ADAPTER_SCALE, keep_mask=i.keep,
                                              dropout_p=i.dropout_p)


def _adapter_kernel(i: Inputs, backend: str):
    return lambda *t: routed_adapter(*t, temperature=TEMPERATURE, scale=ADAPTER_SCALE, dropout_p=i.dropout_p,
                                     generator=_generator(), backend=backend)


ROUTED_ADAPTER = OpCheck(
    "routed_adapter",
    ("dx", "drouter_input", "drouter_weight", "drouter_bias", "ddown_weight", "ddown_bias", "dup_weight", "dup_bias"),
    _adapter_inputs, _adapter_oracle, _adapter_kernel,
)
_ADAPTER_SHAPES = [  # (B, L, D, E, R, label)
    (2, 7, 24, 2, 8, "awkward"), (1, 1, 1, 1, 1, "awkward"), (2, 33, 70, 3, 5, "awkward"),
    (1, 19, 130, 1, 64, "awkward"), (3, 5, 48, 2, 16, "awkward"),
    (4, 512, 4096, 2, 8, "LaVIN LLaMA-7B"), (2, 300, 1024, 20, 16, "20 experts"),
]
ROUTED_ADAPTER.cases.extend(
    Case("routed_adapter", dict(B=b, L=length, D=dim, E=e, R=r), label, variant)
    for b, length, dim, e, r, label in _ADAPTER_SHAPES for variant in ("", "dropout")
)
ROUTED_ADAPTER.cases.append(Case("routed_adapter", dict(B=1, L=(2**31 // 4096) + 64, D=4096, E=2, R=8),
                                 "B*L*D > 2^31 (64-bit offsets)", rows=(0, 1, 2**19 - 1, 2**19, 2**19 + 63)))

OPS = {op.name: op for op in (CROSS_ATTENTION, MEMVP_MEMORY, ROUTED_ADAPTER)}
