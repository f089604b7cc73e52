"""memvp_memory on every backend that runs here, against a float64 reference."""
from __future__ import annotations

import pytest
import torch
from vlfast.kernels.utils import poisoned_outputs

from vlfast.gpucheck.cases import memvp_fp16_overflow_inputs
from vlfast.ops import BackendUnsupportedError, memvp_memory
from vlfast.ops.memvp_memory import unsupported_reason
from vlfast.ops.reference import dropout_keep_mask, memvp_memory_autograd
from vlfast.ops.tolerance import assert_close_to_reference, forward_backward, plain_forward_backward, seed_of

RUNNABLE_BACKENDS = ["triton", "cpu", "torch"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [  # (B, L, M, D): sizes awkward for tiled kernels (the GPU check runs them on the CUDA ones)
    (2, 7, 5, 24),
    (1, 1, 1, 1),
    (2, 33, 40, 64),  # ragged row block, memory padded
    (1, 19, 320, 48),  # LLaMA-7B's memory size: several memory tiles
    (1, 9, 600, 16),  # beyond the 512 rows the kernels once held whole (LLaVA-1.5 feeds 576)
    (3, 5, 17, 130),  # D not a multiple of the D chunk
    (1, 130, 20, 24),  # two row tiles of 128, the second ragged
]
SCALE = 0.7


def make_inputs(shape):
    b, length, m, d = shape
    # Small magnitudes as in MemVP (z is scaled by 0.01, positions ~ N(0, 0.02)), but large enough
    # for SiLU to be non-linear.
    x = torch.randn(b, length, d, dtype=torch.float64)
    z = torch.randn(b, m, d, dtype=torch.float64) / d**0.5
    key_pos = torch.randn(m, d, dtype=torch.float64) / d**0.5
    value_pos = torch.randn(m, d, dtype=torch.float64)
    dout = torch.randn(b, length, d, dtype=torch.float64)
    return (x, z, key_pos, value_pos), dout


def oracle_and_kernel(backend: str, dropout_p: float, keep):
    """The autograd reference with dropout mask `keep`, and the backend's op drawing that mask (seed 7)."""

    def oracle(*t):
        return memvp_memory_autograd(*t, scale=SCALE, keep_mask=keep, dropout_p=dropout_p)

    def kernel(*t):
        return memvp_memory(*t, scale=SCALE, dropout_p=dropout_p, generator=torch.Generator().manual_seed(7),
                            backend=backend)

    return oracle, kernel


def pooled(results: list[tuple[torch.Tensor, list[torch.Tensor]]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Outputs and gradients of several draws, each flattened and concatenated."""
    outs, grads = zip(*results, strict=True)
    return torch.cat([o.flatten() for o in outs]), [torch.cat([g.flatten() for g in gs])
                                                    for gs in zip(*grads, strict=True)]


@pytest.mark.parametrize("backend", RUNNABLE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["nodrop", "drop"])
def test_matches_float64_reference(backend, dtype, shape, dropout_p):
    keep = dropout_keep_mask(seed_of(7), (shape[0], shape[1], shape[2]), dropout_p) if dropout_p else None
    oracle, kernel = oracle_and_kernel(backend, dropout_p, keep)
    # The rule compares maxima: over a handful of elements the plain op's can be luckily small (at
    # 1 x 1 x 1 x 1 in bf16, one draw in 45 fails by 2x for a chain that rounds fewer intermediates
    # than it), so tiny shapes are checked over 16 independent draws, pooled.
    b, length, m, d = shape
    draws = 16 if b * length * d < 64 else 1
    ref, plain, got = [], [], []
    for _ in range(draws):
        tensors, dout = make_inputs(shape)
        # The reference sees the same dtype-rounded inputs, so only the computation's error is compared.
        tensors, dout = [t.to(dtype).double() for t in tensors], dout.to(dtype).double()
        ref.append(forward_backward(oracle, tensors, dout, torch.float64))
        plain.append(forward_backward(oracle, tensors, dout, dtype))
        with poisoned_outputs():
            got.append(forward_backward(kernel, tensors, dout, dtype))
    assert got[0][0].dtype == dtype and got[0][0].shape == ref[0][0].shape
    assert all(g.dtype == dtype and g.shape == r.shape for g, r in zip(got[0][1], ref[0][1], strict=True))
    (ref_out, ref_grads), (plain_out, plain_grads), (out, grads) = pooled(ref), pooled(plain), pooled(got)
    assert_close_to_reference("out", out, ref_out, plain_out, factor=2)
    names = ("dx", "dz", "dkey_pos", "dvalue_pos")
    for name, got_grad, ref_grad, plain_grad in zip(names, grads, ref_grads, plain_grads, strict=True):
        assert_close_to_reference(name, got_grad, ref_grad, plain_grad, factor=3)


@pytest.mark.parametrize("backend", RUNNABLE_BACKENDS)
@pytest.mark.parametrize("large", ["activation", "dpre"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["nodrop", "drop"])
def test_fp16_intermediates_do_not_overflow(backend, large, dropout_p):
    """x K^T (forward) or dout V^T (backward) past fp16's 65504 with every result within it: the plain
    fp16 op overflows; every backend must stay as close to float64 as fp32 rounded to fp16 is."""
    shape = (2, 9, 160, 24)
    dims = dict(zip("BLMD", shape, strict=True))
    tensors, dout = memvp_fp16_overflow_inputs(dims, large, torch.Generator().manual_seed(0))
    keep = dropout_keep_mask(seed_of(7), shape[:3], dropout_p) if dropout_p else None
    oracle, kernel = oracle_and_kernel(backend, dropout_p, keep)

    ref_out, ref_grads = forward_backward(oracle, tensors, dout, torch.float64)
    fp16_out, fp16_grads = forward_backward(oracle, tensors, dout, torch.float16)
    assert all(r.half().isfinite().all() for r in (ref_out, *ref_grads))
    assert not all(r.isfinite().all() for r in (fp16_out, *fp16_grads))
    plain_out, plain_grads = plain_forward_backward(oracle, tensors, dout, torch.float16, fp32_intermediates=True)
    with poisoned_outputs():
        out, grads = forward_backward(kernel, tensors, dout, torch.float16)
    assert_close_to_reference("out", out, ref_out, plain_out, factor=2)
    for name, got, ref, plain in zip(("dx", "dz", "dkey_pos", "dvalue_pos"), grads, ref_grads, plain_grads,
                                     strict=True):
        assert_close_to_reference(name, got, ref, plain, factor=3)


@pytest.mark.parametrize("backend", RUNNABLE_BACKENDS)
def test_dropout_is_reproducible_from_the_generator(backend):
    tensors, _ = make_inputs((2, 9, 6, 16))
    tensors = [t.float() for t in tensors]

    def run(seed):
        return memvp_memory(*tensors, dropout_p=0.5, generator=torch.Generator().manual_seed(seed), backend=backend)

    assert torch.equal(run(1), run(1))
    assert not torch.allclose(run(1), run(2))


def test_torch_backend_multiplies_in_the_input_dtype():
    """The torch backend (auto's choice on CPU and GPU) runs its products in the input dtype, as the
    unfused op does: in fp32 it was 2.9x slower for bf16 on CPU, and on GPUs fp32 products run on
    CUDA cores instead of tensor cores (meta tensors stand in for a GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class ProductDtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.dtypes = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.bmm, torch.ops.aten.mm):
                self.dtypes |= {a.dtype for a in args if isinstance(a, torch.Tensor)}
            return func(*args, **(kwargs or {}))

    for device in ("meta", "cpu"):
        x, z, kp, vp = [t.to(device, torch.bfloat16) for t in make_inputs((2, 5, 3, 16))[0]]
        with ProductDtypes() as seen:
            out = memvp_memory(x, z, kp, vp, scale=SCALE, dropout_p=0.2, backend="torch")
        assert seen.dtypes == {torch.bfloat16} and out.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_products_take_the_gpu_path_on_meta_tensors(dtype):
    """The triton backend's products run through cuBLAS only on GPUs (on CPU tensors the tests take
    torch's fp32 path): on meta tensors the GPU path's calls (bmm with an fp32 output, baddbmm with
    alpha, fp16 fitting) must accept their arguments and give the dtypes and shapes the launcher uses."""
    from vlfast.kernels.memvp_memory import _bmm, _product, intermediate_dtype

    def meta(*shape, dtype=dtype):
        return torch.empty(*shape, dtype=dtype, device="meta")

    x, keys = meta(2, 9, 24), meta(2, 5, 24)
    pre = _bmm(x, keys.transpose(1, 2), torch.float32)
    assert pre.dtype == torch.float32 and pre.shape == (2, 9, 5)
    act = meta(2, 9, 5, dtype=intermediate_dtype(dtype))
    out = _product(act, keys, dtype, 0.7)
    dkeys = _product(act.transpose(1, 2), x, intermediate_dtype(dtype), 0.7)
    assert out.dtype == dtype and out.shape == (2, 9, 24)
    assert dkeys.dtype == intermediate_dtype(dtype) and dkeys.shape == (2, 5, 24)


def test_dropout_keep_rate_and_mask_agreement():
    for p in (0.1, 0.5):
        keep = dropout_keep_mask(seed_of(0), (4, 512, 512), p)
        assert abs(keep.float().mean().item() - (1 - p)) < 3e-3
    # Backends draw the same mask, so their dropped outputs agree with each other.
    tensors, _ = make_inputs((2, 9, 6, 16))
    tensors = [t.float() for t in tensors]
    outs = [memvp_memory(*tensors, dropout_p=0.4, generator=torch.Generator().manual_seed(5), backend=b)
            for b in RUNNABLE_BACKENDS]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "change, error, words",
    [
        (dict(x=torch.randn(8, 16)), ValueError, "x must be 3-dimensional"),
        (dict(z=torch.randn(3, 5, 16)), ValueError, "z must have shape (2, M, 16)"),
        (dict(z=torch.randn(2, 5, 16, dtype=torch.float16)), TypeError, "z must have dtype torch.float32"),
        (dict(key_pos=torch.randn(4, 16)), ValueError, "key_pos must have shape (M, D) = (5, 16)"),
        (dict(value_pos=torch.randn(5, 15)), ValueError, "value_pos must have shape (M, D) = (5, 16)"),
        (dict(value_pos="rows"), TypeError, "value_pos must be a torch.Tensor"),
        (dict(dropout_p=1.0), ValueError, "dropout_p must be in [0, 1)"),
        (dict(key_pos=torch.randn(5, 16, device="meta")), ValueError, "one device"),
    ],
)
def test_bad_arguments_name_the_argument(change, error, words):
    args = dict(x=torch.randn(2, 3, 16), z=torch.randn(2, 5, 16), key_pos=torch.randn(5, 16),
                value_pos=torch.randn(5, 16), dropout_p=0.0)
    args.update(change)
    with pytest.raises(error) as info:
        memvp_memory(args["x"], args["z"], args["key_pos"], args["value_pos"], dropout_p=args["dropout_p"])
    assert words in str(info.value)


def test_backends_say_why_they_refuse():
    x, z, kp, vp = torch.randn(1, 2, 8), torch.randn(1, 600, 8), torch.randn(600, 8), torch.randn(600, 8)
    # Both GPU backends tile the memory: any M (LLaVA-1.5 feeds 576 visual tokens).
    assert unsupported_reason("cuda", x.half(), z.half()) is None and unsupported_reason("triton", x, z) is None
    assert "cuda supports float16, bfloat16, got float32" in unsupported_reason("cuda", x, z)
    with pytest.raises(BackendUnsupportedError, match="CUDA tensors"):
        memvp_memory(x, z, kp, vp, backend="cuda")


@pytest.mark.parametrize("backend", ["triton", "cpu"])  # the torch backend is plain PyTorch, not this op
def test_opcheck(backend):
    tensors, _ = make_inputs((2, 5, 3, 16))
    args = [t.float().requires_grad_() for t in tensors]
    torch.library.opcheck(torch.ops.vlfast.memvp_memory_fwd.default, (*args, 0.5, 0.2, 123, backend))


@pytest.mark.parametrize("backend", ["triton", "cpu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_keeps_the_pre_activation(backend, dtype):
    """The kernel backends' forward returns x (z + key_pos)^T in fp32 beside the output, which the
    backward reads instead of recomputing it: every element written, to the plain product's accuracy."""
    shape = (2, 130, 40, 24)
    tensors = [t.to(dtype) for t in make_inputs(shape)[0]]
    x, z, key_pos, _ = tensors
    with poisoned_outputs():
        _, pre = torch.ops.vlfast.memvp_memory_fwd(*tensors, SCALE, 0.3, 11, backend)
    ref = x.double() @ (z.double() + key_pos.double()).transpose(-1, -2)
    plain = (x @ (z + key_pos).transpose(-1, -2)).double()
    assert pre.dtype == torch.float32 and pre.shape == (2, 130, 40)
    assert_close_to_reference("pre", pre, ref, plain, factor=2)


@pytest.mark.parametrize("backend", RUNNABLE_BACKENDS)
def test_largest_width(backend):
    """D = 8192, the largest supported width (LLaMA-65B), on a few rows."""
    tensors, dout = make_inputs((1, 3, 5, 8192))
    tensors, dout = [t.float().double() for t in tensors], dout.float().double()
    ref_out, ref_grads = forward_backward(lambda *t: memvp_memory_autograd(*t, scale=SCALE), tensors, dout,
                                          torch.float64)
    plain_out, plain_grads = forward_backward(lambda *t: memvp_memory_autograd(*t, scale=SCALE), tensors, dout,
                                              torch.float32)
    out, grads = forward_backward(lambda *t: memvp_memory(*t, scale=SCALE, backend=backend), tensors, dout,
                                  torch.float32)
    assert_close_to_reference("out", out, ref_out, plain_out, factor=2)
    for name, got, ref, plain in zip(("dx", "dz", "dkey_pos", "dvalue_pos"), grads, ref_grads, plain_grads,
                                     strict=True):
        assert_close_to_reference(name, got, ref, plain, factor=3)
