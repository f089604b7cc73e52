"""vlfast.costmodel on numbers checked by hand, and its command line."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
from transformers import Blip2Config, OPTConfig

from vlfast.costmodel import (
    A100,
    H100,
    H200,
    LLMS,
    PAPER,
    AdapterShape,
    AttentionShape,
    Launch,
    MemVPShape,
    Setup,
    Stack,
    adapter_config,
    attention_config,
    chain_seconds,
    cross_attention_floor,
    cross_attention_triton,
    matmul,
    memvp_config,
    memvp_triton,
    routed_adapter_triton,
)
from vlfast.costmodel.__main__ import main
from vlfast.costmodel.training import QFormerStack, against_paper, fused_seconds_saved, llm_config, transfer_lines


def test_parameter_counts_of_known_models():
    # OPT-6.7B: 32 x (4 x 4096^2 + 2 x 4096 x 16384) + 50272 x 4096 (positions and biases left out).
    assert Stack.from_config(LLMS["opt-6.7b"]).parameters == 32 * 201_326_592 + 205_914_112
    # LLaMA-7B, gated FFN: 32 x (4 x 4096^2 + 3 x 4096 x 11008) + 32000 x 4096 = 6.607e9 (+ input embeddings: 6.74B).
    assert Stack.from_config(LLMS["llama-7b"]).parameters == 6_607_077_376
    # EVA ViT-g as BLIP-2 runs it (39 layers): 39 x (4 x 1408^2 + 2 x 1408 x 6144), no head.
    vision = Stack.from_config(Blip2Config().vision_config)
    assert (vision.parameters, vision.vocab, vision.causal) == (984_023_040, 0, False)


def test_forward_and_backward_flops_by_hand():
    stack = Stack(layers=1, hidden=2, ffn=3, vocab=5)
    # projections 2*4*(4*4 + 2*2*3) = 224; causal attention 4*16*2/2 = 64; MemVP 4*4*3*2 = 96; head 2*4*2*5 = 80
    assert stack.forward_flops(4, memory_rows=3) == 224 + 64 + 96 + 80
    # frozen backward: every product again, attention and MemVP twice
    assert stack.input_gradient_flops(4, memory_rows=3) == 464 + 64 + 96
    assert Stack(1, 2, 3, causal=False).forward_flops(4) == 224 + 128


def test_qformer_flops_by_hand():
    q = QFormerStack(layers=2, hidden=2, heads=1, ffn=3, cross_every=2, queries=1, image_width=4)
    # per layer 2*1*(16 + 12) + 4*1*1*2 = 64; one cross layer: 2*1*2*4 + 2*5*2*4*2 + 4*1*5*2 = 16 + 160 + 40
    assert q.forward_flops(image_tokens=5) == 2 * 64 + 216


def test_setup_components():
    setup = Setup(Stack.from_config(LLMS["opt-2.7b"]))
    flops = setup.flops_per_sample()
    assert setup.llm_tokens == 64 and setup.memory_rows == 0
    cached = Setup(setup.llm, feature_cache=True, connector="memory", train_qformer=False).flops_per_sample()
    assert cached["vision tower"] == 0
    assert cached["LLM"] < flops["LLM"] / 1.8  # 32 text tokens instead of 64
    assert cached["Q-Former + projector"] < flops["Q-Former + projector"] / 2.5  # forward only
    assert setup.feature_bytes() == 2 * 257 * 1408
    assert setup.gpu_hours(1e6, H100) < setup.gpu_hours(1e6, A100)


def test_attention_floor_by_hand():
    # fp16 q and out 2 x 8 elements, k and v 2 x 12, fp32 lse 2 x 4 bytes; FLOPs 4 * 2 * 3 * 4
    floor = cross_attention_floor(AttentionShape(1, 1, 2, 3, 4, masked=False))
    assert (floor.bytes, floor.flops) == (2 * (16 + 24) + 8, 96)


def test_launch_by_hand():
    hw = H100  # 132 SMs, 3.0 TB/s, ~7.2 TB/s L2, 0.6 us latency
    one_wave = Launch("k", programs=132, warps=4, dram=132e6, l2=0, flops=0, steps=1)
    assert one_wave.waves(hw) == 1 and one_wave.seconds(hw) == pytest.approx(132e6 / 3.0e12)
    # 133 programs: one SM runs two, so the launch takes twice as long as 132 programs' share
    ragged = Launch("k", programs=133, warps=4, dram=133e6, l2=0, flops=0, steps=1)
    assert ragged.seconds(hw) == pytest.approx(2 * 1e6 * 132 / 3.0e12)
    # 1000 steps each waiting on DRAM: 1000 x 0.6 us / 2 loads in flight, per wave; 4 warps: 4 programs an SM
    latency = Launch("k", programs=132 * 4 + 1, warps=4, dram=0, l2=0, flops=0, steps=1000)
    assert latency.waves(hw) == 2 and latency.seconds(hw) == pytest.approx(2 * 1000 * 0.6e-6 / 2)
    assert Launch("k", 132, 4, dram=0, l2=55e6, flops=0, steps=0).seconds(hw) == pytest.approx(55e6 / hw.l2_bandwidth)
    # 5.5 TB/s measured on an H100 PCIe (114 SMs, 1,755 MHz), scaled to the SXM part's 132 SMs at 1,980 MHz
    assert hw.l2_bandwidth == pytest.approx(7.18e12, rel=1e-3)
    # two stages keep one step's loads in flight: twice the latency term of three
    assert replace(latency, in_flight=1).seconds(hw) == pytest.approx(2 * latency.seconds(hw))


def test_eager_matrix_products_pay_cublas_tiles_l2_and_the_fp32_rate():
    # (512 x 4096) @ (4096 x 320) in 256 x 256 tiles: A re-read by 1 more column tile, B by 1 more row tile
    product = matmul(512, 320, 4096, 2, batch=8)
    assert product.bytes == 2 * 8 * (512 * 4096 + 4096 * 320 + 512 * 320)
    assert product.l2 == 2 * 8 * (512 * 4096 + 4096 * 320)
    assert matmul(256, 256, 64, 2).l2 == 0
    # 16 x 16 tiles of a 4096^2 output over 128: its operands' re-reads make it L2-bound (by 11% on the H200)
    wide = matmul(4096, 4096, 128, 2)
    l2_bound = (wide.bytes + wide.l2) / H200.l2_bandwidth
    assert wide.seconds(H200) == pytest.approx(l2_bound)
    assert l2_bound > 1.1 * max(wide.bytes / H200.bandwidth, wide.flops / H200.matrix_flops)
    # The 8192^3 bf16 product stays compute-bound, as vlfast.gpucheck measured it on the H200 (717 TFLOP/s);
    # in fp32 it runs on CUDA cores (PyTorch's default: no tf32), 12x slower on an H100
    square = 8192
    assert matmul(square, square, square, 2).seconds(H200) == pytest.approx(2 * square**3 / H200.matrix_flops)
    assert matmul(square, square, square, 4).seconds(H100) == pytest.approx(2 * square**3 / H100.fp32_flops)


@pytest.mark.parametrize("hw", [H100, H200], ids=lambda hw: hw.name)
def test_projections_can_fail(hw):
    """Worse launches project slower: smaller tiles, more re-reads, fewer programs than SMs, more L2 traffic."""
    def seconds(kernels):
        return chain_seconds(kernels, hw)

    qformer = AttentionShape(32, 12, 32, 257, 64)
    cfg = attention_config(qformer)
    for backward in (False, True):
        base = seconds(cross_attention_triton(qformer, cfg, hw, backward))
        smaller = {**cfg, "BLOCK_M": 16, "BLOCK_N": 16}  # K and V read by two query blocks, 4x the steps
        assert seconds(cross_attention_triton(qformer, smaller, hw, backward)) > base
    few = AttentionShape(1, 2, 32, 257, 64)  # 2 programs for 132 SMs
    assert seconds(cross_attention_triton(few, cfg, hw)) > seconds(cross_attention_triton(replace(few, batch=66), cfg,
                                                                                          hw)) / 66 * 2
    # K and V re-read per query block come from DRAM once they no longer fit in L2
    long = AttentionShape(512, 12, 256, 257, 64)
    kernels = cross_attention_triton(long, attention_config(long), hw)
    assert kernels[0].dram > 8 * 2 * 2 * long.elements(long.kv_len)

    memvp = MemVPShape(8, 512, 320, 4096)
    mcfg = memvp_config(memvp)
    small = {kernel: {**blocks, "BLOCK": 64} for kernel, blocks in mcfg.items()}  # 16x the programs
    for backward in (False, True):
        assert seconds(memvp_triton(memvp, small, hw, backward)) > seconds(memvp_triton(memvp, mcfg, hw, backward))
    few = {kernel: {**blocks, "BLOCK": 2**16} for kernel, blocks in mcfg.items()}  # 20 programs for 132 SMs
    assert seconds(memvp_triton(memvp, few, hw)) > seconds(memvp_triton(memvp, mcfg, hw))

    adapter = AdapterShape(16, 16384, 4096, 8, 2)
    acfg = adapter_config(adapter)
    assert seconds(routed_adapter_triton(adapter, {**acfg, "programs_per_sm": 0.25}, hw)) > seconds(
        routed_adapter_triton(adapter, acfg, hw))  # 33 programs for 132 SMs
    narrow = {**acfg, "columns": {**acfg["columns"], "BLOCK_D": 256}}  # 16 column programs
    assert seconds(routed_adapter_triton(adapter, narrow, hw, backward=True)) > seconds(
        routed_adapter_triton(adapter, acfg, hw, backward=True))


def test_reproduces_the_paper_within_a_quarter():
    lines = transfer_lines(*PAPER["pair"])
    checks = against_paper(lines)
    assert set(checks) == {"scratch", "VPGTrans"}
    for check in checks.values():
        assert abs(check["error"]) <= 0.25
        assert 0.3 < check["implied_utilisation"] < 0.6
    hours = [ln.gpu_hours for ln in lines if ln.kind == "projected" and not ln.label.startswith("(")]
    assert hours == sorted(hours, reverse=True)  # every vlfast change saves time


def test_fused_ops_save_little_at_blip2_scale():
    """Honest scale: the fused Q-Former attention and MemVP are memory-bound slivers of a sample."""
    setup = Setup(Stack.from_config(LLMS["opt-6.7b"]), connector="memory", feature_cache=True)
    saved = fused_seconds_saved(setup)
    assert 0 < saved < 0.01 * setup.seconds_per_sample()


def test_other_pairs_and_local_configs(tmp_path):
    OPTConfig(hidden_size=2560, ffn_dim=10240, num_hidden_layers=32).save_pretrained(tmp_path)
    assert llm_config(str(tmp_path)).hidden_size == 2560
    assert llm_config(str(tmp_path / "config.json")).ffn_dim == 10240
    from_dir = transfer_lines(str(tmp_path), "llama-7b")
    named = transfer_lines("opt-2.7b", "llama-7b")
    assert [ln.gpu_hours for ln in from_dir] == [ln.gpu_hours for ln in named]
    assert all(ln.kind == "projected" for ln in named)  # the paper reports no such pair
    with pytest.raises(ValueError, match="unknown LLM 'gpt-9'"):
        llm_config("gpt-9")


def test_command_line(capsys):
    main(["--json"])
    lines = json.loads(capsys.readouterr().out)
    assert lines[0]["label"] == "scratch (paper)" and lines[0]["gpu_hours"] == 631.5
    main(["--source", "opt-125m", "--target", "opt-1.3b", "--gpu", "h100"])
    out = capsys.readouterr().out
    assert "H100-hours" in out and "opt-1.3b" in out and "(paper)" not in out
    for options, message in ((["--target", "gpt-9"], "unknown LLM 'gpt-9'"),
                             (["--utilisation", "0"], "--utilisation must be in (0, 1]")):
        bad = subprocess.run([sys.executable, "-m", "vlfast.costmodel", *options], capture_output=True, text=True)
        assert bad.returncode != 0 and message in bad.stderr
