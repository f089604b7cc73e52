"""cross_attention on every backend that runs here, against a float64 reference."""
from __future__ import annotations

import pytest
import torch
from vlfast.kernels.utils import poisoned_outputs

import vlfast
from vlfast.ops import BackendUnsupportedError, cross_attention, use_backend
from vlfast.ops.reference import cross_attention_autograd
from vlfast.ops.tolerance import assert_close_to_reference, forward_backward

RUNNABLE_BACKENDS = ["triton", "cpu", "torch"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [  # (B, H, Lq, Lk, D)
    (2, 3, 32, 257, 64),  # the Q-Former's: one query block, 257 keys = 4 full blocks + 1
    (1, 2, 1, 1, 32),
    (2, 1, 17, 33, 48),
    (1, 2, 70, 19, 80),  # several query blocks: dK / dV accumulate across programs
    (2, 1, 5, 100, 128),
]


def make_inputs(shape, dtype, masked: bool):
    b, h, lq, lk, d = shape
    q, k, v = (torch.randn(b, h, n, d, dtype=torch.float64) for n in (lq, lk, lk))
    dout = torch.randn(b, h, lq, d, dtype=torch.float64)
    mask = None
    if masked:
        mask = torch.rand(b, lk) > 0.3
        mask[0, 0] = True
        if b > 1:
            mask[-1] = False  # a sample with no visible key: zeros and zero gradients
    return (q, k, v), dout, mask


@pytest.mark.parametrize("backend", RUNNABLE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_matches_float64_reference(backend, dtype, shape, masked):
    tensors, dout, mask = make_inputs(shape, dtype, masked)
    # The reference sees the same dtype-rounded inputs, so only the computation's error is compared.
    tensors, dout = [t.to(dtype).double() for t in tensors], dout.to(dtype).double()
    def oracle(q, k, v):
        return cross_attention_autograd(q, k, v, mask)

    ref_out, ref_grads = forward_backward(oracle, tensors, dout, torch.float64)
    plain_out, plain_grads = forward_backward(oracle, tensors, dout, dtype)
    with poisoned_outputs():
        out, grads = forward_backward(lambda q, k, v: cross_attention(q, k, v, mask, backend=backend), tensors, dout,
                                      dtype)
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert_close_to_reference("out", out, ref_out, plain_out, factor=2)
    for name, got, ref, plain in zip(("dq", "dk", "dv"), grads, ref_grads, plain_grads, strict=True):
        assert got.dtype == dtype
        assert_close_to_reference(name, got, ref, plain, factor=3)


@pytest.mark.parametrize("backend", RUNNABLE_BACKENDS)
def test_fully_masked_rows_give_zeros_and_zero_gradients(backend):
    q, k, v = (torch.randn(2, 2, n, 32, requires_grad=True) for n in (5, 9, 9))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1] = False
    with poisoned_outputs():
        out = cross_attention(q, k, v, mask, backend=backend)
    out.sum().backward()
    assert out[1].abs().max() == 0 and out[0].abs().min() > 0
    assert q.grad[1].abs().max() == 0 and k.grad[1].abs().max() == 0 and v.grad[1].abs().max() == 0
    assert torch.isfinite(q.grad).all() and q.grad[0].abs().max() > 0


def test_scale_argument_and_default():
    q, k, v = (torch.randn(1, 2, n, 48, dtype=torch.float64) for n in (4, 6, 6))
    for scale in (None, 0.3):
        expected = cross_attention_autograd(q, k, v, scale=scale)
        torch.testing.assert_close(cross_attention(q, k, v, scale=scale, backend="torch"), expected)
        torch.testing.assert_close(
            cross_attention(q.float(), k.float(), v.float(), scale=scale, backend="cpu"), expected.float()
        )


def test_non_contiguous_inputs():
    q, k, v = (torch.randn(1, n, 2, 32).transpose(1, 2) for n in (7, 11, 11))
    expected = cross_attention_autograd(q, k, v)
    for backend in RUNNABLE_BACKENDS:
        torch.testing.assert_close(cross_attention(q, k, v, backend=backend), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "change, error, words",
    [
        (dict(q=torch.randn(2, 8, 32)), ValueError, "q must be 4-dimensional"),
        (dict(q=[[1.0]]), TypeError, "q must be a torch.Tensor"),
        (dict(k=torch.randn(2, 3, 10, 32)), ValueError, "k must have shape (2, 2, Lk, 32)"),
        (dict(k=torch.randn(2, 2, 10, 16)), ValueError, "k must have shape"),
        (dict(v=torch.randn(2, 2, 9, 32)), ValueError, "v must have the shape of k"),
        (dict(v=torch.randn(2, 2, 10, 32, dtype=torch.float16)), TypeError, "v must have dtype torch.float32"),
        (dict(kv_mask=torch.ones(2, 10)), TypeError, "kv_mask must have dtype torch.bool"),
        (dict(kv_mask=torch.ones(2, 9, dtype=torch.bool)), ValueError, "kv_mask must have shape (B, Lk) = (2, 10)"),
        (dict(kv_mask=torch.ones(2, 10, dtype=torch.bool, device="meta")), ValueError, "one device"),
        (dict(q=torch.randn(2, 2, 0, 32)), ValueError, "non-empty"),
        (dict(q=torch.ones(2, 2, 4, 32, dtype=torch.int64), k=torch.ones(2, 2, 10, 32, dtype=torch.int64),
              v=torch.ones(2, 2, 10, 32, dtype=torch.int64)), TypeError, "floating-point"),
    ],
)
def test_bad_arguments_name_the_argument(change, error, words):
    args = dict(q=torch.randn(2, 2, 4, 32), k=torch.randn(2, 2, 10, 32), v=torch.randn(2, 2, 10, 32), kv_mask=None)
    args.update(change)
    with pytest.raises(error) as info:
        cross_attention(args["q"], args["k"], args["v"], args["kv_mask"])
    assert words in str(info.value)


def test_backends_say_why_they_refuse():
    q = torch.randn(1, 1, 4, 32)
    with pytest.raises(BackendUnsupportedError, match="takes CUDA tensors"):
        cross_attention(q, q, q, backend="cuda")
    with pytest.raises(BackendUnsupportedError, match="float32, float16, bfloat16"):
        cross_attention(q.double(), q.double(), q.double(), backend="triton")
    big = torch.randn(1, 1, 2, 300)
    with pytest.raises(BackendUnsupportedError, match="head dim <= 256"):
        cross_attention(big, big, big, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        cross_attention(q, q, q, backend="flash")


def test_use_backend_and_auto_choice(monkeypatch):
    calls = []
    real = vlfast.ops.cross_attention.__globals__["resolve_backend"]

    def spy(*args):
        calls.append(real(*args))
        return calls[-1]

    monkeypatch.setitem(vlfast.ops.cross_attention.__globals__, "resolve_backend", spy)
    q = torch.randn(1, 1, 4, 32)
    cross_attention(q, q, q)
    with use_backend("triton"):
        cross_attention(q, q, q)
        with use_backend("cpu"):
            cross_attention(q, q, q)
        cross_attention(q, q, q, backend="torch")  # the call's own choice wins
    cross_attention(q.double(), q.double(), q.double())  # only torch takes float64
    assert calls == ["torch", "triton", "cpu", "torch", "torch"]
