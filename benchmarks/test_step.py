"""One training step of a VPG on a frozen LLM: vlfast against Hugging Face's BLIP-2 (measured, CPU).

Both sides hold the same weights and train the same parameters (Q-Former, query tokens, projector;
vision tower and OPT frozen), and take a step of forward, backward and AdamW on the same batch.
Variants of vlfast show where its time goes: running the tower every step, the feature cache
(features read from disk), and memory-space prompting (MemVP: prompts as FFN memory rows).

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
from vlfast.models.vision import FeatureCache

BATCH, TEXT_TOKENS, IMAGE_SIZE, PATCH = 8, 24, 112, 14
GROUP = f"training step (forward + backward + AdamW), CPU, float32, batch {BATCH}"
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

    def __init__(self, model: Blip2ForConditionalGeneration) -> None:
        self.model = model
        model.vision_model.requires_grad_(False)
        model.language_model.requires_grad_(False)
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def loss(self, batch: dict) -> torch.Tensor:
        queries = torch.full((BATCH, CONFIG.num_query_tokens), CONFIG.image_token_index)
        input_ids = torch.cat([queries, batch["input_ids"]], dim=1)
        labels = torch.cat([torch.full_like(queries, IGNORE_INDEX), batch["labels"]], dim=1)
        return self.model(pixel_values=batch["pixel_values"], input_ids=input_ids, labels=labels).loss


class VlfastStep:
    """vlfast's VisionLanguageModel on the same weights; `cache` reads the features from disk."""

    def __init__(self, hf: Blip2ForConditionalGeneration, connector: str, cache: FeatureCache | None) -> None:
        hf = copy.deepcopy(hf)  # the memory connector patches the LLM: no variant may share it
        vpg = VPG.from_hf(hf)
        tower = hf.vision_model
        tower.post_layernorm = nn.Identity()  # the VPG's ln_vision is BLIP-2's post-layernorm
        vpg.ln_vision.requires_grad_(False)  # frozen in BLIP-2 too, as part of the vision model
        self.model = VisionLanguageModel(tower, vpg, hf.language_model, connector=connector)
        self.cache = cache
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)

    def loss(self, batch: dict) -> torch.Tensor:
        text = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
        if self.cache is None:
            return self.model(**text, pixel_values=batch["pixel_values"])
        return self.model(**text, image_features=self.cache.features(batch["keys"], batch["pixel_values"]))


def train_step(step) -> float:
    loss = step.loss(BATCH_DATA)
    loss.backward()
    step.optimizer.step()
    step.optimizer.zero_grad(set_to_none=True)
    return loss.item()


def make_batch() -> dict:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(2, 8000, (BATCH, TEXT_TOKENS), generator=generator)
    return {"pixel_values": torch.randn(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator),
            "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone(),
            "keys": [f"benchmark/{i}" for i in range(BATCH)]}


BATCH_DATA = make_batch()


@pytest.fixture(scope="module")
def steps(tmp_path_factory) -> dict:
    torch.manual_seed(0)
    hf = Blip2ForConditionalGeneration(CONFIG)
    # Each step gets its own copy: a step changes the trainable weights.
    cache_root = tmp_path_factory.mktemp("features")

    def vlfast(connector: str, cached: bool) -> VlfastStep:
        step = VlfastStep(hf, connector, None)
        if cached:
            step.cache = FeatureCache(cache_root, step.model.vision_tower, {"size": IMAGE_SIZE})
            step.cache.features(BATCH_DATA["keys"], BATCH_DATA["pixel_values"])  # filled before timing
        return step

    return {
        "hf-blip2": HFStep(copy.deepcopy(hf)),
        "vlfast": vlfast("input", cached=False),
        "vlfast + feature cache": vlfast("input", cached=True),
        "vlfast + feature cache + memory prompts": vlfast("memory", cached=True),
    }


def test_same_loss(steps):
    """The compared steps compute the same function (dropout off): the timings compare like with like."""
    losses = {}
    for name in ("hf-blip2", "vlfast", "vlfast + feature cache"):
        model = steps[name].model.eval()
        with torch.no_grad():
            losses[name] = steps[name].loss(BATCH_DATA).item()
        model.train()
    assert abs(losses["vlfast"] - losses["hf-blip2"]) < 1e-5 * losses["hf-blip2"], losses
    # The cache stores fp16 features.
    assert abs(losses["vlfast + feature cache"] - losses["hf-blip2"]) < 1e-3 * losses["hf-blip2"], losses


@pytest.mark.parametrize("name", ["hf-blip2", "vlfast", "vlfast + feature cache",
                                  "vlfast + feature cache + memory prompts"])
def test_training_step(benchmark, steps, name):
    benchmark.group = GROUP
    shares = scaled_and_full_shares()
    benchmark.extra_info["flop_shares"] = shares
    table = markdown_table(["component", *shares], [[c, *(f"{s[c]:.0%}" for s in shares.values())]
                                                   for c in shares["this benchmark"]])
    save_markdown("step", "Training step: vlfast against Hugging Face BLIP-2 (measured, CPU)",
                  f"Same weights and trainable parameters; times in the CPU table above ({GROUP}). Share of a "
                  f"training sample's FLOPs per component (vlfast.costmodel), here and at full size:\n\n{table}")
    loss = benchmark.pedantic(train_step, args=(steps[name],), rounds=10, iterations=1, warmup_rounds=2)
    assert torch.isfinite(torch.tensor(loss))
