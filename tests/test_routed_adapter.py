"""routed_adapter on every backend that runs here, against a float64 reference."""
from __future__ import annotations

import pytest
import torch
from vlfast.kernels.utils import poisoned_outputs

from vlfast.ops import BackendUnsupportedError, routed_adapter
from vlfast.ops.reference import dropout_keep_mask, routed_adapter_autograd
from vlfast.ops.tolerance import assert_close_to_reference, forward_backward, seed_of

RUNNABLE_BACKENDS = ["triton", "cpu", "torch"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [  # (B, L, D, E, R)
    (2, 7, 24, 2, 8),  # LaVIN's two experts of rank 8
    (1, 1, 1, 1, 1),
    (2, 33, 70, 3, 5),  # odd D, three experts, ragged row block
    (1, 19, 130, 1, 64),  # one expert, the largest rank
    (3, 5, 48, 2, 16),
]
NAMES = ("dx", "drouter_input", "drouter_weight", "drouter_bias", "ddown_weight", "ddown_bias", "dup_weight",
         "dup_bias")
TEMPERATURE, SCALE = 2.0, 0.8


def make_inputs(shape):
    b, length, d, e, r = shape
    return [
        torch.randn(b, length, d), torch.randn(b, d), torch.randn(e, d) / d**0.5, torch.randn(e),
        torch.randn(r, d) / d**0.5, torch.randn(r) * 0.1, torch.randn(e, d, r) / r**0.5, torch.randn(e, d) * 0.1,
    ], torch.randn(b, length, d)


@pytest.mark.parametrize("backend", RUNNABLE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dropout_p", [0.0, 0.25], ids=["nodrop", "drop"])
def test_matches_float64_reference(backend, dtype, shape, dropout_p):
    tensors, dout = make_inputs(shape)
    tensors, dout = [t.to(dtype).double() for t in tensors], dout.to(dtype).double()
    keep = dropout_keep_mask(seed_of(3), (shape[0], shape[1], shape[4]), dropout_p) if dropout_p else None

    def oracle(*t):
        return routed_adapter_autograd(*t, temperature=TEMPERATURE, scale=SCALE, keep_mask=keep, dropout_p=dropout_p)

    def kernel(*t):
        return routed_adapter(*t, temperature=TEMPERATURE, scale=SCALE, dropout_p=dropout_p,
                              generator=torch.Generator().manual_seed(3), backend=backend)

    ref_out, ref_grads = forward_backward(oracle, tensors, dout, torch.float64)
    plain_out, plain_grads = forward_backward(oracle, tensors, dout, dtype)
    with poisoned_outputs():
        out, grads = forward_backward(kernel, tensors, dout, dtype)
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert_close_to_reference("out", out, ref_out, plain_out, factor=2)
    for name, got, ref, plain in zip(NAMES, grads, ref_grads, plain_grads, strict=True):
        assert got.dtype == dtype and got.shape == ref.shape, name
        assert_close_to_reference(name, got, ref, plain, factor=3)


@pytest.mark.parametrize("backend", RUNNABLE_BACKENDS)
def test_dropout_is_reproducible_and_shared_across_backends(backend):
    tensors, _ = make_inputs((2, 9, 16, 2, 8))

    def run(seed, which=backend):
        return routed_adapter(*tensors, dropout_p=0.5, generator=torch.Generator().manual_seed(seed), backend=which)

    assert torch.equal(run(1), run(1))
    assert not torch.allclose(run(1), run(2))
    torch.testing.assert_close(run(1), run(1, "torch"), atol=1e-5, rtol=1e-5)


def test_routing_weights_follow_the_router():
    """Two samples whose router inputs pick different experts get those experts' outputs."""
    b, length, d, r = 2, 3, 8, 4
    x = torch.randn(b, length, d)
    router_weight = torch.eye(2, d) * 50  # expert 0 <- feature 0, expert 1 <- feature 1
    router_input = torch.zeros(b, d)
    router_input[0, 0] = router_input[1, 1] = 1.0
    down_w, down_b = torch.randn(r, d), torch.zeros(r)
    up_w, up_b = torch.randn(2, d, r), torch.randn(2, d)
    out = routed_adapter(x, router_input, router_weight, torch.zeros(2), down_w, down_b, up_w, up_b, temperature=1.0)
    for sample, expert in ((0, 0), (1, 1)):
        alone = x[sample] + (x[sample] @ down_w.T) @ up_w[expert].T + up_b[expert]
        torch.testing.assert_close(out[sample], alone, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "name, value, error, words",
    [
        ("x", torch.randn(3, 8), ValueError, "x must be 3-dimensional"),
        ("router_input", torch.randn(3, 8), ValueError, "router_input must have shape (2, 8)"),
        ("router_weight", torch.randn(2, 7), ValueError, "router_weight must have shape (2, 8)"),
        ("router_bias", torch.randn(3), ValueError, "router_bias must have shape (2,)"),
        ("down_weight", torch.randn(4, 8, dtype=torch.float16), TypeError, "down_weight must have dtype torch.float32"),
        ("down_bias", torch.randn(5), ValueError, "down_bias must have shape (4,)"),
        ("up_weight", torch.randn(2, 8, 5), ValueError, "up_weight must have shape (2, 8, 4)"),
        ("up_bias", torch.randn(2, 9), ValueError, "up_bias must have shape (2, 8)"),
        ("up_bias", "bias", TypeError, "up_bias must be a torch.Tensor"),
    ],
)
def test_bad_arguments_name_the_argument(name, value, error, words):
    args = dict(x=torch.randn(2, 3, 8), router_input=torch.randn(2, 8), router_weight=torch.randn(2, 8),
                router_bias=torch.randn(2), down_weight=torch.randn(4, 8), down_bias=torch.randn(4),
                up_weight=torch.randn(2, 8, 4), up_bias=torch.randn(2, 8))
    args[name] = value
    with pytest.raises(error) as info:
        routed_adapter(*args.values())
    assert words in str(info.value)


def test_bad_scalars_and_backends():
    tensors, _ = make_inputs((1, 2, 8, 2, 4))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        routed_adapter(*tensors, temperature=0.0)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        routed_adapter(*tensors, dropout_p=1.5)
    with pytest.raises(BackendUnsupportedError, match="CUDA tensors"):
        routed_adapter(*tensors, backend="cuda")
    wide, _ = make_inputs((1, 2, 8, 2, 65))
    with pytest.raises(BackendUnsupportedError, match="rank <= 64"):
        routed_adapter(*wide, backend="triton")


@pytest.mark.parametrize("backend", RUNNABLE_BACKENDS)
def test_opcheck(backend):
    tensors, _ = make_inputs((2, 5, 16, 2, 4))
    args = [t.requires_grad_() for t in tensors]
    torch.library.opcheck(torch.ops.vlfast.routed_adapter_fwd.default, (*args, 2.0, 0.5, 0.2, 7, backend))
