"""VPG.from_lavis on checkpoints written with LAVIS's key names and shapes (tiny, random), against the
LAVIS Q-Former computed directly from those weights in float64."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlfast.models import VPG

HIDDEN, LAYERS, INTERMEDIATE, VISION, QUERIES, LLM = 128, 4, 96, 40, 5, 36  # 2 heads of 64, cross in layers 0, 2
LAYER = "Qformer.bert.encoder.layer."


def lavis_state(projector: str | None, text_branch: bool = False, seed: int = 0, *, vision: int = VISION,
                llm: int = LLM) -> dict[str, torch.Tensor]:
    """A LAVIS state dict: what the VPG needs, plus keys it must ignore (the ViT, stage 1's LM head,
    position_ids; InstructBLIP's text embeddings and text FFN when `text_branch`)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * scale

    def linear(name: str, out: int, inp: int) -> None:
        state.update({f"{name}.weight": randn(out, inp, scale=inp ** -0.5), f"{name}.bias": randn(out, scale=0.1)})

    def norm(name: str, width: int) -> None:
        state.update({f"{name}.weight": 1 + randn(width, scale=0.1), f"{name}.bias": randn(width, scale=0.1)})

    state["query_tokens"] = randn(1, QUERIES, HIDDEN)
    norm("ln_vision", vision)
    norm("Qformer.bert.embeddings.LayerNorm", HIDDEN)
    for i in range(LAYERS):
        for block, width in [("attention", HIDDEN)] + ([("crossattention", vision)] if i % 2 == 0 else []):
            linear(f"{LAYER}{i}.{block}.self.query", HIDDEN, HIDDEN)
            linear(f"{LAYER}{i}.{block}.self.key", HIDDEN, width)
            linear(f"{LAYER}{i}.{block}.self.value", HIDDEN, width)
            linear(f"{LAYER}{i}.{block}.output.dense", HIDDEN, HIDDEN)
            norm(f"{LAYER}{i}.{block}.output.LayerNorm", HIDDEN)
        linear(f"{LAYER}{i}.intermediate_query.dense", INTERMEDIATE, HIDDEN)
        linear(f"{LAYER}{i}.output_query.dense", HIDDEN, INTERMEDIATE)
        norm(f"{LAYER}{i}.output_query.LayerNorm", HIDDEN)
        if text_branch:
            linear(f"{LAYER}{i}.intermediate.dense", INTERMEDIATE, HIDDEN)
            linear(f"{LAYER}{i}.output.dense", HIDDEN, INTERMEDIATE)
            norm(f"{LAYER}{i}.output.LayerNorm", HIDDEN)
    if projector is not None:
        linear(projector, llm, HIDDEN)
    state.update({"visual_encoder.cls_token": randn(1, 1, vision), "visual_encoder.blocks.0.attn.q_bias": randn(vision),
                  "Qformer.cls.predictions.bias": randn(11),
                  "Qformer.bert.embeddings.position_ids": torch.arange(7)[None]})
    if text_branch:
        state.update({"Qformer.bert.embeddings.word_embeddings.weight": randn(11, HIDDEN),
                      "Qformer.bert.embeddings.position_embeddings.weight": randn(7, HIDDEN)})
    return state


def reference(state: dict[str, torch.Tensor], projector: str, features: torch.Tensor) -> torch.Tensor:
    """LAVIS's query-only path, as plain float64 ops on the LAVIS-named weights."""
    s = {k: v.double() for k, v in state.items()}

    def linear(x: torch.Tensor, name: str) -> torch.Tensor:
        return x @ s[f"{name}.weight"].T + s[f"{name}.bias"]

    def norm(x: torch.Tensor, name: str, eps: float = 1e-12) -> torch.Tensor:
        mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        return (x - mean) / torch.sqrt(var + eps) * s[f"{name}.weight"] + s[f"{name}.bias"]

    def attention(x: torch.Tensor, source: torch.Tensor, name: str, heads: int = HIDDEN // 64) -> torch.Tensor:
        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)

        q, k, v = (split(linear(t, f"{name}.self.{p}")) for t, p in ((x, "query"), (source, "key"), (source, "value")))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(HIDDEN // heads), dim=-1)
        attended = (weights @ v).transpose(1, 2).reshape(x.shape)
        return norm(linear(attended, f"{name}.output.dense") + x, f"{name}.output.LayerNorm")

    image = norm(features.double(), "ln_vision", eps=1e-5)
    x = norm(s["query_tokens"].expand(features.shape[0], -1, -1), "Qformer.bert.embeddings.LayerNorm")
    for i in range(LAYERS):
        x = attention(x, x, f"{LAYER}{i}.attention")
        if f"{LAYER}{i}.crossattention.self.query.weight" in s:
            x = attention(x, image, f"{LAYER}{i}.crossattention")
        ffn = linear(F.gelu(linear(x, f"{LAYER}{i}.intermediate_query.dense")), f"{LAYER}{i}.output_query.dense")
        x = norm(ffn + x, f"{LAYER}{i}.output_query.LayerNorm")
    return linear(x, projector)


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("projector", ["opt_proj", "t5_proj", "llm_proj", "llama_proj"])
def test_matches_lavis(projector, tmp_path):
    state = lavis_state(projector, text_branch=projector == "llm_proj")
    torch.save({"model": state, "epoch": 3}, tmp_path / "checkpoint.pth")
    vpg = VPG.from_lavis(tmp_path / "checkpoint.pth")
    assert not vpg.training
    qformer = vpg.config.qformer
    assert (qformer.hidden_size, qformer.num_layers, qformer.num_heads, qformer.intermediate_size) == (128, 4, 2, 96)
    assert (vpg.config.vision_width, qformer.cross_layers, vpg.config.num_query_tokens) == (40, [0, 2], 5)
    assert (vpg.config.llm_hidden_size, vpg.config.vision_layer_norm_eps, qformer.layer_norm_eps) == (36, 1e-5, 1e-12)
    features = torch.randn(2, 9, VISION, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = vpg(features)
    assert got.shape == (2, QUERIES, LLM)
    assert relative_error(got, reference(state, projector, features)) < 1e-5


def test_bare_state_dict_and_from_pretrained(tmp_path):
    state = lavis_state("llama_proj")
    torch.save({"model": state}, tmp_path / "wrapped.pth")
    torch.save(state, tmp_path / "bare.pth")
    features = torch.randn(1, 9, VISION)
    with torch.no_grad():
        expected = VPG.from_lavis(tmp_path / "wrapped.pth")(features)
        for vpg in (VPG.from_lavis(tmp_path / "bare.pth"), VPG.from_pretrained(tmp_path / "wrapped.pth"),
                    VPG.from_pretrained(str(tmp_path / "bare.pth"))):
            assert not vpg.training
            torch.testing.assert_close(vpg(features), expected, rtol=0, atol=0)


def test_vision_layer_norm_eps(tmp_path):
    torch.save({"model": lavis_state("opt_proj")}, tmp_path / "checkpoint.pth")
    assert VPG.from_lavis(tmp_path / "checkpoint.pth", vision_layer_norm_eps=1e-6).ln_vision.eps == 1e-6


def test_stage_one_checkpoint_has_no_llm_projector(tmp_path):
    state = lavis_state(None, text_branch=True)
    state.update({"vision_proj.weight": torch.randn(8, HIDDEN), "itm_head.weight": torch.randn(2, HIDDEN),
                  "temp": torch.tensor(0.07)})
    torch.save({"model": state}, tmp_path / "blip2_pretrained.pth")
    with pytest.raises(ValueError, match=r"blip2_pretrained\.pth has no LLM projector .* not trained with an LLM"):
        VPG.from_lavis(tmp_path / "blip2_pretrained.pth")
    state.update({"opt_proj.weight": torch.randn(LLM, HIDDEN), "opt_proj.bias": torch.randn(LLM)})
    torch.save({"model": state}, tmp_path / "with_projector.pth")
    assert VPG.from_lavis(tmp_path / "with_projector.pth").config.llm_hidden_size == LLM  # stage 1's heads ignored


def test_unknown_file_names_the_missing_keys(tmp_path):
    torch.save({"model": {"encoder.weight": torch.randn(3, 3)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"other\.pth is not a LAVIS checkpoint.*missing keys \(5\): query_tokens, "
                                         r"ln_vision\.weight, .*unexpected keys \(1\): encoder\.weight"):
        VPG.from_lavis(tmp_path / "other.pth")


def corrupt(state: dict) -> None:
    del state[f"{LAYER}3.attention.self.query.weight"]
    state[f"{LAYER}3.crossattention.self.query.weight"] = torch.randn(HIDDEN, HIDDEN)  # not every 2nd layer
    state[f"{LAYER}2.intermediate_query.dense.bias"] = torch.randn(INTERMEDIATE + 1)


@pytest.mark.parametrize("change, message", [
    (corrupt, r"missing keys \(1\): Qformer\.bert\.encoder\.layer\.3\.attention\.self\.query\.weight; unexpected keys "
              r"\(1\): .*layer\.3\.crossattention\.self\.query\.weight; wrong shapes \(1\): .*layer\.2\."
              r"intermediate_query\.dense\.bias \[97\] \(expected \[96\]\)"),
    (lambda s: s.update({f"{LAYER}9.extra.weight": torch.zeros(1)}),  # layers 4-8 are then missing
     r"missing keys \(126\): .*layer\.4\..*, \.\.\.; unexpected keys \(1\)"),
    (lambda s: s.update({"opt_proj.weight": torch.zeros(LLM, HIDDEN)}), r"2 LLM projectors \(opt_proj, llama_proj\)"),
    (lambda s: s.update({"query_tokens": torch.zeros(1, QUERIES, 100)}), r"hidden size 100 is not a multiple of 64"),
])
def test_malformed_checkpoints(change, message, tmp_path):
    state = lavis_state("llama_proj")
    change(state)
    torch.save({"model": state}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=message):
        VPG.from_lavis(tmp_path / "bad.pth")


class NotATensor:
    pass


def test_refuses_pickled_objects(tmp_path):
    torch.save({"model": lavis_state("opt_proj"), "extra": NotATensor()}, tmp_path / "objects.pth")
    with pytest.raises(ValueError, match=r"objects\.pth: torch\.load\(weights_only=True\) cannot read it"):
        VPG.from_lavis(tmp_path / "objects.pth")
