"""Gradient checkpointing of the Q-Former and the frozen LLM: the same loss and gradients, with the
layers run again in the backward pass; refused where per-batch state would be gone by then."""
from __future__ import annotations

import pytest
import torch

from tests.export.conftest import tiny_model
from vlfast import defaults
from vlfast.data.collate import CaptionCollator
from vlfast.models.vlm import length_groups


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return defaults.shapes_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def loss_and_gradients(kind: str, tokenizer, checkpointing: bool) -> tuple[torch.Tensor, dict, dict]:
    model = tiny_model(kind, tokenizer).train()
    model.vpg.requires_grad_(True)
    model.gradient_checkpointing(checkpointing)
    calls = {"qformer": 0, "llm": 0}
    # Inner modules: transformers wraps a layer's class forward, so the recomputation calls those.
    layers = {"qformer": model.vpg.qformer.layers[0],
              "llm": model.llm.model.layers[0].mlp if kind == "llama" else model.llm.encoder.block[0].layer[-1]}
    for name, layer in layers.items():
        def counted(*args, forward=layer.forward, name=name, **kwargs):
            calls[name] += 1
            return forward(*args, **kwargs)

        layer.forward = counted
    batch = CaptionCollator.for_llm(tokenizer, model.llm).tokenize(["a large red circle", "two shapes"],
                                                                   ["", "how many shapes are there ?"])
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 40, 40)
    loss = model(batch["input_ids"], batch["attention_mask"], batch["labels"], pixel_values=pixels)
    loss.backward()
    # A causal LLM runs the caption and the longer question as two length groups: a call each.
    runs = 1 if model.is_encoder_decoder else len(length_groups(batch["attention_mask"]))
    return loss.detach(), {n: p.grad.clone() for n, p in model.vpg.named_parameters()}, {
        "qformer": calls["qformer"], "llm per group": calls["llm"] / runs}


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_same_loss_and_gradients_with_layers_recomputed(tokenizer, kind):
    loss, gradients, calls = loss_and_gradients(kind, tokenizer, checkpointing=False)
    loss_ckpt, gradients_ckpt, calls_ckpt = loss_and_gradients(kind, tokenizer, checkpointing=True)
    assert calls == {"qformer": 1, "llm per group": 1}
    assert calls_ckpt == {"qformer": 2, "llm per group": 2}  # the backward pass ran each layer again
    torch.testing.assert_close(loss_ckpt, loss)
    for name, gradient in gradients.items():
        torch.testing.assert_close(gradients_ckpt[name], gradient, msg=name)


def test_refused_where_the_llm_holds_per_batch_state(tokenizer):
    for options in ({"connector": "memory"}, {"mma": {}}):
        model = tiny_model("llama", tokenizer, **options)
        with pytest.raises(ValueError, match="gradient checkpointing needs the input connector and no MMA"):
            model.gradient_checkpointing()
    model = tiny_model("llama", tokenizer)
    model.gradient_checkpointing()
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.llm.modules())
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.release_llm().modules())
