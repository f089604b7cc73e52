"""One training step of a VPG on a frozen LLM: vlfast against Hugging Face's BLIP-2 (measured, CPU).

Both sides hold the same weights and train the same parameters (Q-Former, query tokens, projector;
vision tower and OPT frozen), and take a step of forward, backward and AdamW on the same batch.
Variants of vlfast show where its time goes: running the tower every step, cached features (what
a transfer run trains on: the tower's features, stored fp16 in its feature shards
(vlfast.data.feature_shards), read back by the DataLoader's workers and passed to the model by
vlfast.transfer.data.model_images; here computed once before timing, reading is not timed), and
memory-space prompting (MemVP: prompts as FFN memory rows).

The sizes are BLIP-2 OPT-2.7B scaled down to a CPU, keeping the share of FLOPs each component has
at full size (vlfast.costmodel counts both; they are in the results' extra_info).

    pytest benchmarks/test_step.py --benchmark-only
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig

from benchmarks.results import markdown_table, save_markdown
from vlfast.costmodel import LLMS, Setup, Stack
from vlfast.costmodel.training import QFormerStack
from vlfast.data.collate import IGNORE_INDEX
from vlfast.models import VPG, VisionLanguageModel
from vlfast.models.vision import tower_features
from vlfast.transfer.data import model_images

BATCH, TEXT_TOKENS, IMAGE_SIZE, PATCH = 8, 24, 112, 14
GROUP = "training step (forward + backward + AdamW), {device}, float32, batch " + str(BATCH)
NO_GPU = "no CUDA device here: GPU times are projected (vlfast.costmodel, test_gpu_hours.py), never measured"
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU))]
CONFIG = Blip2Config(
    vision_config=Blip2VisionConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=10,
                                    num_attention_heads=6, image_size=IMAGE_SIZE, patch_size=PATCH,
                                    initializer_range=0.02),  # the default 1e-10 gives ~1e-8 features
    qformer_config=Blip2QFormerConfig(hidden_size=192, num_hidden_layers=4, num_attention_heads=4,
                                      intermediate_size=768, encoder_hidden_size=384,
                                      attention_probs_dropout_prob=0.0),  # vlfast's fused attention has none
    text_config=OPTConfig(vocab_size=8192, hidden_size=512, ffn_dim=2048, num_hidden_layers=6, num_attention_heads=8,
                          word_embed_proj_dim=512, max_position_embeddings=128).to_dict(),
    num_query_tokens=16, image_token_index=8191,
)
IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2 + 1


def flop_shares(setup: Setup) -> dict[str, float]:
    flops = setup.flops_per_sample()
    return {name: round(value / sum(flops.values()), 3) for name, value in flops.items()}


def scaled_and_full_shares() -> dict[str, dict[str, float]]:
    scaled = Setup(Stack.from_config(CONFIG.text_config), Stack.from_config(CONFIG.vision_config),
                   QFormerStack.from_config(CONFIG), IMAGE_TOKENS, TEXT_TOKENS)
    return {"this benchmark": flop_shares(scaled), "BLIP-2 OPT-2.7B": flop_shares(Setup(Stack.from_config(
        LLMS["opt-2.7b"])))}


class HFStep:
    """BLIP-2 in transformers: image placeholder tokens in input_ids, the tower run every step."""

    def __init__(self, model: Blip2ForConditionalGeneration, device: str) -> None:
        self.model, self.batch = model.to(device), on(device, BATCH_DATA)
        model.vision_model.requires_grad_(False)
        model.language_model.requires_grad_(False)
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def loss(self, batch: dict) -> torch.Tensor:
        text = batch["input_ids"]
        queries = torch.full((BATCH, CONFIG.num_query_tokens), CONFIG.image_token_index, device=text.device)
        input_ids = torch.cat([queries, text], dim=1)
        labels = torch.cat([torch.full_like(queries, IGNORE_INDEX), batch["labels"]], dim=1)
        return self.model(pixel_values=batch["pixel_values"], input_ids=input_ids, labels=labels).loss


class VlfastStep:
    """vlfast's VisionLanguageModel on the same weights; with `cached`, its batch holds the tower's
    features as the transfer's feature shards give them (stored fp16, read back as float32)."""

    def __init__(self, hf: Blip2ForConditionalGeneration, connector: str, device: str, cached: bool) -> None:
        hf = copy.deepcopy(hf)  # the memory connector patches the LLM: no variant may share it
        vpg = VPG.from_hf(hf)
        tower = hf.vision_model
        tower.post_layernorm = nn.Identity()  # the VPG's ln_vision is BLIP-2's post-layernorm
        vpg.ln_vision.requires_grad_(False)  # frozen in BLIP-2 too, as part of the vision model
        self.model = VisionLanguageModel(tower, vpg, hf.language_model, connector=connector).to(device).train()
        self.batch = on(device, BATCH_DATA)
        if cached:
            pixels = self.batch.pop("pixel_values")
            self.batch["features"] = tower_features(self.model.vision_tower, pixels).to(torch.float16).float()
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)

    def loss(self, batch: dict) -> torch.Tensor:
        text = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
        return self.model(**text, **model_images(batch, batch["input_ids"].device))


def train_step(step) -> float:
    loss = step.loss(step.batch)
    loss.backward()
    step.optimizer.step()
    step.optimizer.zero_grad(set_to_none=True)
    return loss.item()


def make_batch() -> dict:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(2, 8000, (BATCH, TEXT_TOKENS), generator=generator)
    return {"pixel_values": torch.randn(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator),
            "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


BATCH_DATA = make_batch()


def on(device: str, batch: dict) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def make_steps(hf: Blip2ForConditionalGeneration, device: str) -> dict:
    """Each step gets its own copy of the weights: a step changes the trainable ones."""
    return {
        "hf-blip2": HFStep(copy.deepcopy(hf), device),
        "vlfast": VlfastStep(hf, "input", device, cached=False),
        "vlfast + cached features": VlfastStep(hf, "input", device, cached=True),
        "vlfast + cached features + memory prompts": VlfastStep(hf, "memory", device, cached=True),
    }


@pytest.fixture(scope="module", params=DEVICES)
def steps(request) -> dict:
    torch.manual_seed(0)
    return {"device": request.param, **make_steps(Blip2ForConditionalGeneration(CONFIG), request.param)}


def test_same_loss(steps):
    """The compared steps compute the same function (dropout off): the timings compare like with like."""
    losses = {}
    for name in ("hf-blip2", "vlfast", "vlfast + cached features"):
        model = steps[name].model.eval()
        with torch.no_grad():
            losses[name] = steps[name].loss(steps[name].batch).item()
        model.train()
    assert abs(losses["vlfast"] - losses["hf-blip2"]) < 1e-5 * losses["hf-blip2"], losses
    # The feature shards store fp16 features.
    assert abs(losses["vlfast + cached features"] - losses["hf-blip2"]) < 1e-3 * losses["hf-blip2"], losses


@pytest.mark.parametrize("name", ["hf-blip2", "vlfast", "vlfast + cached features",
                                  "vlfast + cached features + memory prompts"])
def test_training_step(benchmark, steps, name):
    benchmark.group = GROUP.format(device=steps["device"].upper())
    shares = scaled_and_full_shares()
    benchmark.extra_info["flop_shares"] = shares
    table = markdown_table(["component", *shares], [[c, *(f"{s[c]:.0%}" for s in shares.values())]
                                                   for c in shares["this benchmark"]])
    save_markdown("step", "Training step: vlfast against Hugging Face BLIP-2 (measured, CPU)",
                  f"Same weights and trainable parameters; times in the table above "
                  f"({GROUP.format(device='CPU')}). Share of a training sample's FLOPs per component "
                  f"(vlfast.costmodel), here and at full size:\n\n{table}")
    loss = benchmark.pedantic(train_step, args=(steps[name],), rounds=10, iterations=1, warmup_rounds=2)
    assert torch.isfinite(torch.tensor(loss))
