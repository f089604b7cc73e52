"""Reading the VPG out of LAVIS checkpoints by their own key names: BLIP-2 stage 2 (`opt_proj`, `t5_proj`),
InstructBLIP (`llm_proj`) and VPGTrans's VL-LLaMA / VL-Vicuna (`llama_proj`).

The config is inferred from the tensor shapes; the Q-Former weights go through Hugging Face's names
(the renaming of transformers' official BLIP-2 converter) into `hf_qformer_state_dict`, so there is
one conversion path from either source.
"""
from __future__ import annotations

import pickle
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from vlfast.models.qformer import QFormerConfig, hf_qformer_state_dict
from vlfast.models.vpg import VPGConfig

PROJECTORS = ("opt_proj", "t5_proj", "llm_proj", "llama_proj")
LAYER = "Qformer.bert.encoder.layer."
HEAD_WIDTH = 64  # LAVIS's Q-Former is BERT-base, 12 heads of 64: the files store no head count
# Keys a LAVIS checkpoint may hold that the VPG does not use (the query tokens never reach them).
IGNORED = re.compile("|".join([
    r"(visual_encoder|opt_model|t5_model|llm_model|llama_model)\.",  # the vision tower and the LLM, loaded apart
    r"(Qformer\.cls|vision_proj|text_proj|itm_head)\.|temp$",  # stage 1's text, contrastive and matching heads
    r"Qformer\.bert\.embeddings\.(word_embeddings\.|position_embeddings\.|position_ids$)",  # text tokens only
    rf"{re.escape(LAYER)}\d+\.(intermediate|output)\.",  # the text tokens' FFN; queries use `*_query`
]))
LAYER_INDEX = re.compile(rf"{re.escape(LAYER)}(\d+)\.")
SHOWN = 5  # keys listed in an error, before the count


def read_lavis_vpg(path: str | Path, vision_layer_norm_eps: float = 1e-5) -> tuple[VPGConfig, dict[str, Tensor]]:
    """(config, state dict in VPG's names) from a LAVIS checkpoint. ValueError naming the file and the
    missing, unexpected or misshapen keys when it is not one with a Q-Former and exactly one LLM projector."""
    state = {k: v for k, v in _load(path).items() if not IGNORED.match(k)}
    config, projector = _infer_config(path, state, vision_layer_norm_eps)
    expected = _lavis_shapes(config, projector)
    _check(path, missing=[k for k in expected if k not in state], unexpected=[k for k in state if k not in expected],
           wrong=[f"{k} {_shape(state[k])} (expected {list(shape)})" for k, shape in expected.items()
                  if k in state and _shape(state[k]) != list(shape)])
    hf = {_hf_name(k): v for k, v in state.items() if k.startswith("Qformer.bert.")}
    out = {f"qformer.{k}": v for k, v in hf_qformer_state_dict(hf, config.qformer).items()}
    out.update({k: state[k] for k in ("query_tokens", "ln_vision.weight", "ln_vision.bias")})
    out.update({f"projector.{p}": state[f"{projector}.{p}"] for p in ("weight", "bias")})
    return config, out


def _load(path: str | Path) -> dict:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise ValueError(f"{path}: torch.load(weights_only=True) cannot read it ({error}). LAVIS and VPGTrans "
                         f"checkpoints hold only tensors and plain containers; other pickles are not loaded") from error
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: a LAVIS checkpoint is a dict, this file holds a {type(checkpoint).__name__}")
    state = checkpoint.get("model", checkpoint)  # runner files: {"model": state dict, ...}; else the state dict
    if not isinstance(state, dict):
        raise ValueError(f"{path}: its 'model' entry is a {type(state).__name__}, not a state dict")
    return state


def _infer_config(path: str | Path, state: dict, vision_layer_norm_eps: float) -> tuple[VPGConfig, str]:
    projectors = [p for p in PROJECTORS if any(k.startswith(f"{p}.") for k in state)]
    if len(projectors) > 1:
        raise ValueError(f"{path}: {len(projectors)} LLM projectors ({', '.join(projectors)}), expected one")
    projector = projectors[0] if projectors else f"<{'|'.join(PROJECTORS)}>"
    ffn, attention = f"{LAYER}0.intermediate_query.dense.weight", f"{LAYER}0.attention.self.query.weight"
    anchors = {"query_tokens": 3, "ln_vision.weight": 1, attention: 2, ffn: 2, f"{projector}.weight": 2}
    missing = [k for k in anchors if k not in state]
    if missing == [f"{projector}.weight"] and not projectors:
        raise ValueError(f"{path} has no LLM projector (none of {', '.join(PROJECTORS)}): a stage-1 BLIP-2 "
                         f"Q-Former (blip2_pretrained.pth) was not trained with an LLM; use a stage-2 checkpoint "
                         f"such as blip2_pretrained_opt2.7b.pth")
    known = ("query_tokens", "ln_vision.", "Qformer.bert.", *(f"{p}." for p in PROJECTORS))
    _check(path, missing=missing, unexpected=[k for k in state if not k.startswith(known)])
    _check(path, wrong=[f"{k} {_shape(state[k])} (expected {dims} dimensions)" for k, dims in anchors.items()
                        if not isinstance(state[k], Tensor) or state[k].dim() != dims])
    _, queries, hidden = state["query_tokens"].shape
    if hidden % HEAD_WIDTH:
        raise ValueError(f"{path}: hidden size {hidden} is not a multiple of {HEAD_WIDTH}, so the number of heads "
                         f"(hidden // {HEAD_WIDTH} in LAVIS's BERT-base Q-Former) cannot be inferred")
    indices = {k: int(m.group(1)) for k in state if (m := LAYER_INDEX.match(k))}
    cross = sorted({i for k, i in indices.items() if ".crossattention." in k})
    if not cross:
        raise ValueError(f"{path}: its Q-Former has no cross-attention layers (no {LAYER}*.crossattention.* keys)")
    layers = 1 + max(indices.values())
    # Cross-attention sits in layers 0, f, 2f, ...: a set of another form shows up as missing and
    # unexpected crossattention keys in the full check.
    frequency = cross[1] - cross[0] if len(cross) > 1 else layers
    qformer = QFormerConfig(hidden, layers, hidden // HEAD_WIDTH, state[ffn].shape[0],
                            state["ln_vision.weight"].shape[0], frequency)
    return VPGConfig(qformer, queries, state[f"{projector}.weight"].shape[0], vision_layer_norm_eps), projector


def _lavis_shapes(config: VPGConfig, projector: str) -> dict[str, tuple[int, ...]]:
    """Every key the VPG needs from a LAVIS checkpoint, with its shape."""
    q = config.qformer
    h = q.hidden_size
    shapes = {"query_tokens": (1, config.num_query_tokens, h)}

    def linear(name: str, out: int, inp: int) -> None:
        shapes.update({f"{name}.weight": (out, inp), f"{name}.bias": (out,)})

    def norm(name: str, width: int) -> None:
        shapes.update({f"{name}.weight": (width,), f"{name}.bias": (width,)})

    norm("ln_vision", q.encoder_hidden_size)
    norm("Qformer.bert.embeddings.LayerNorm", h)
    for i in range(q.num_layers):
        blocks = ["attention", "crossattention"] if i in q.cross_layers else ["attention"]
        for block in blocks:
            width = q.encoder_hidden_size if block == "crossattention" else h  # keys and values read the image
            prefix = f"{LAYER}{i}.{block}."
            linear(f"{prefix}self.query", h, h)
            linear(f"{prefix}self.key", h, width)
            linear(f"{prefix}self.value", h, width)
            linear(f"{prefix}output.dense", h, h)
            norm(f"{prefix}output.LayerNorm", h)
        linear(f"{LAYER}{i}.intermediate_query.dense", q.intermediate_size, h)
        linear(f"{LAYER}{i}.output_query.dense", h, q.intermediate_size)
        norm(f"{LAYER}{i}.output_query.LayerNorm", h)
    linear(projector, config.llm_hidden_size, h)
    return shapes


def _hf_name(key: str) -> str:
    """A LAVIS Q-Former key in Hugging Face's Blip2QFormerModel names, by the official converter's renaming."""
    key = key.removeprefix("Qformer.bert.").replace("embeddings.LayerNorm.", "layernorm.")
    return key.replace(".self.", ".attention.")


def _shape(value: object) -> list[int] | str:
    return list(value.shape) if isinstance(value, Tensor) else type(value).__name__


def _check(path: str | Path, missing: Sequence[str] = (), unexpected: Sequence[str] = (),
           wrong: Sequence[str] = ()) -> None:
    problems = [f"{what} ({len(keys)}): {', '.join(keys[:SHOWN])}{', ...' if len(keys) > SHOWN else ''}"
                for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                   ("wrong shapes", wrong)) if keys]
    if problems:
        raise ValueError(f"{path} is not a LAVIS checkpoint of BLIP-2, InstructBLIP or VPGTrans with one LLM "
                         f"projector: {'; '.join(problems)}")
