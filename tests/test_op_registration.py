"""The ops are real torch.library ops: opcheck passes, and torch.compile traces them whole."""
from __future__ import annotations

import pytest
import torch

import vlfast.ops.cross_attention  # noqa: F401  (registers vlfast::cross_attention_*)
from vlfast.ops import cross_attention
from vlfast.ops.reference import cross_attention_autograd


def attention_args(masked: bool, backend: str):
    q = torch.randn(2, 2, 5, 32, requires_grad=True)
    k = torch.randn(2, 2, 9, 32, requires_grad=True)
    v = torch.randn(2, 2, 9, 32, requires_grad=True)
    mask = (torch.rand(2, 9) > 0.3) if masked else None
    return (q, k, v, mask, 32**-0.5, backend)


@pytest.mark.parametrize("backend", ["triton", "cpu"])  # the torch backend is SDPA, not this op
@pytest.mark.parametrize("masked", [False, True])
def test_opcheck(backend, masked):
    torch.library.opcheck(torch.ops.vlfast.cross_attention_fwd.default, attention_args(masked, backend))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_compiles_without_graph_breaks(backend):
    def block(q, k, v, mask):
        return torch.nn.functional.gelu(cross_attention(q * 2.0, k, v, mask, backend=backend)).sum()

    compiled = torch.compile(block, fullgraph=True)
    q, k, v, mask, _, _ = attention_args(True, backend)
    loss = compiled(q, k, v, mask)
    loss.backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    expected = torch.nn.functional.gelu(cross_attention_autograd(q * 2.0, k, v, mask)).sum()
    expected.backward()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    for got, t in zip(grads, (q, k, v), strict=True):
        torch.testing.assert_close(got, t.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_memvp_memory_compiles_without_graph_breaks(backend):
    from vlfast.ops import memvp_memory
    from vlfast.ops.reference import memvp_memory_autograd

    def branch(x, z, key_pos, value_pos):
        return (x + memvp_memory(x, z, key_pos, value_pos, scale=0.1, backend=backend)).square().sum()

    tensors = [torch.randn(2, 5, 16), torch.randn(2, 3, 16), torch.randn(3, 16), torch.randn(3, 16)]
    tensors = [t.requires_grad_() for t in tensors]
    loss = torch.compile(branch, fullgraph=True)(*tensors)
    loss.backward()
    grads = [t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    expected = (tensors[0] + memvp_memory_autograd(*tensors, scale=0.1)).square().sum()
    expected.backward()
    torch.testing.assert_close(loss, expected, atol=1e-4, rtol=1e-5)
    for got, t in zip(grads, tensors, strict=True):
        torch.testing.assert_close(got, t.grad, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_routed_adapter_compiles_without_graph_breaks(backend):
    from vlfast.ops import routed_adapter
    from vlfast.ops.reference import routed_adapter_autograd

    def block(*tensors):
        return routed_adapter(*tensors, temperature=2.0, backend=backend).square().sum()

    tensors = [torch.randn(2, 5, 16), torch.randn(2, 16), torch.randn(3, 16), torch.randn(3), torch.randn(4, 16),
               torch.randn(4), torch.randn(3, 16, 4), torch.randn(3, 16)]
    tensors = [t.requires_grad_() for t in tensors]
    loss = torch.compile(block, fullgraph=True)(*tensors)
    loss.backward()
    grads = [t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    expected = routed_adapter_autograd(*tensors, temperature=2.0).square().sum()
    expected.backward()
    torch.testing.assert_close(loss, expected, atol=1e-3, rtol=1e-5)
    for got, t in zip(grads, tensors, strict=True):
        torch.testing.assert_close(got, t.grad, atol=1e-3, rtol=1e-4)
