"""vlfast._C checks its own arguments (its ops can be called directly, bypassing the Python checks)
and says which GPUs its CUDA kernels run on."""
from __future__ import annotations

import pytest
import torch

from vlfast._extension import ExtensionStatus, extension_status

pytestmark = pytest.mark.skipif(not extension_status().loaded, reason="vlfast._C is not built")


def ops():
    return torch.ops.vlfast_C


def attention(**change):
    args = dict(q=torch.randn(2, 3, 4, 8), k=torch.randn(2, 3, 5, 8), v=torch.randn(2, 3, 5, 8),
                kv_mask=torch.ones(2, 5, dtype=torch.bool))
    args.update(change)
    return ops().cross_attention_forward(args["q"], args["k"], args["v"], args["kv_mask"], 0.5)


@pytest.mark.parametrize("change, words", [
    (dict(q=torch.randn(2, 3, 8, 4).transpose(2, 3)), "q must be contiguous"),
    (dict(k=torch.randn(2, 4, 5, 8)), "k must have size 3 in dim 1"),
    (dict(v=torch.randn(2, 3, 6, 8)), "v must have size 5 in dim 2"),
    (dict(v=torch.randn(2, 3, 5, 8, dtype=torch.float64)), "v must have dtype Float"),
    (dict(kv_mask=torch.ones(2, 5)), "kv_mask must have dtype Bool"),
    (dict(kv_mask=torch.ones(2, 6, dtype=torch.bool)), "kv_mask must have size 5 in dim 1"),
    (dict(q=torch.randn(2, 3, 4), k=torch.randn(2, 3, 5), v=torch.randn(2, 3, 5)), "q must be 4-dimensional"),
    (dict(q=torch.randn(2, 3, 4, 8, dtype=torch.float64), k=torch.randn(2, 3, 5, 8, dtype=torch.float64),
          v=torch.randn(2, 3, 5, 8, dtype=torch.float64)), "float32, float16 or bfloat16 expected"),
])
def test_cross_attention_checks_its_arguments(change, words):
    with pytest.raises(RuntimeError, match=words):
        attention(**change)


def test_memvp_memory_and_routed_adapter_check_their_arguments():
    x, z, pos = torch.randn(2, 3, 8), torch.randn(2, 4, 8), torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="value_pos must have size 4 in dim 0"):
        ops().memvp_memory_forward(x, z, pos, torch.randn(5, 8), 1.0, 0.0, 0)
    pre = torch.randn(2, 3, 4)
    with pytest.raises(RuntimeError, match="dout must have size 3 in dim 1"):
        ops().memvp_memory_backward(torch.randn(2, 4, 8), x, z, pos, pos, pre, 1.0, 0.0, 0)
    with pytest.raises(RuntimeError, match="pre must have dtype Float"):
        ops().memvp_memory_backward(x, x, z, pos, pos, pre.double(), 1.0, 0.0, 0)
    with pytest.raises(RuntimeError, match="pre must have size 4 in dim 2"):
        ops().memvp_memory_backward(x, x, z, pos, pos, torch.randn(2, 3, 5), 1.0, 0.0, 0)
    adapter = [x, torch.randn(2, 8), torch.randn(2, 8), torch.randn(2), torch.randn(4, 8), torch.randn(4),
               torch.randn(2, 8, 4), torch.randn(2, 8)]
    ops().routed_adapter_forward(*adapter, 1.0, 1.0, 0.0, 0)  # well-formed
    with pytest.raises(RuntimeError, match="up_weight must have size 4 in dim 2"):
        ops().routed_adapter_forward(*adapter[:6], torch.randn(2, 8, 5), adapter[7], 1.0, 1.0, 0.0, 0)
    with pytest.raises(RuntimeError, match="weights must have dtype Float"):
        ops().routed_adapter_backward_rows(x, x, torch.ones(2, 2, dtype=torch.float64), *adapter[4:], 1.0, 0.0, 0)


@pytest.mark.parametrize("capability, runs", [
    ((7, 5), False), ((8, 0), True), ((8, 6), True), ((8, 9), True), ((9, 0), True), ((10, 0), True), ((12, 0), True),
])
def test_cuda_kernels_run_where_their_machine_code_or_ptx_does(capability, runs):
    reason = ExtensionStatus(True, "", ("80", "90")).cuda_device_reason(capability)
    assert (reason is None) == runs
    if not runs:
        assert f"this GPU is sm_{capability[0]}{capability[1]}" in reason
        assert f"VLFAST_CUDA_ARCHS={capability[0]}{capability[1]}" in reason


def test_machine_code_for_a_later_gpu_does_not_run_on_an_earlier_one():
    assert "built for sm_90" in ExtensionStatus(True, "", ("90",)).cuda_device_reason((8, 6))
