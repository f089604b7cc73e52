"""VisionLanguageModel on the shapes data with tiny Llama / OPT LLMs saved and reloaded."""
from __future__ import annotations

import itertools

import pytest
import torch
from transformers import AutoModelForCausalLM, Blip2VisionModel

from tests.data.test_coco_and_collate import word_tokenizer
from tests.tiny_models import TINY_MODELS
from vlfast.data.collate import CaptionCollator
from vlfast.data.shapes import ShapesDataset
from vlfast.models import VPG, QFormerConfig, VisionLanguageModel, VPGConfig, vlm
from vlfast.models.vision import tiny_vision_tower, tower_features
from vlfast.models.vlm import LLM_DTYPES, length_groups

WORDS = ["a", "red", "circle", "describe", "the", "image", ":"]


def caption_of(scene) -> str:
    """The first object's colour-free description in the tiny tokenizer's words ('a red circle' or 'a circle')."""
    obj = scene.objects[0]
    return "a red circle" if obj.colour == "red" else "a circle"


@pytest.fixture(params=["llama", "opt"])  # every family's patching is tested in tests/patch
def parts(request, tmp_path):
    llm = TINY_MODELS[request.param]()
    with torch.no_grad():  # weights of std 0.2 instead of 0.02: an LLM whose output depends on its context
        for p in llm.parameters():
            if p.ndim == 2:
                p.mul_(10)
    llm.save_pretrained(tmp_path / "llm")
    tiny_vision_tower().save_pretrained(tmp_path / "tower")
    llm = AutoModelForCausalLM.from_pretrained(tmp_path / "llm")
    tower = Blip2VisionModel.from_pretrained(tmp_path / "tower")
    config = VPGConfig(QFormerConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=48,
                                     encoder_hidden_size=96, hidden_dropout=0.0), num_query_tokens=4,
                       llm_hidden_size=64)
    return tower, llm, config


def batch(collate, start, size=8):
    data = ShapesDataset("train", 64)
    scenes = [data[i] for i in range(start, start + size)]
    pixels = torch.stack([s.image for s in scenes]).float() / 127.5 - 1
    return collate([(p, caption_of(s)) for p, s in zip(pixels, scenes, strict=True)])


@pytest.mark.parametrize("connector, mma", [("input", None), ("memory", None), ("input", {"rank": 4})])
def test_trains_and_generates(parts, connector, mma):
    tower, llm, config = parts
    torch.manual_seed(0)
    model = VisionLanguageModel(tower, VPG(config), llm, connector=connector, mma=mma, tokenizer=word_tokenizer())
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(not p.requires_grad for p in model.llm.parameters() if p.ndim and p.shape[0] == 97)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    collate = CaptionCollator(word_tokenizer(), prompt="describe the image :")
    fixed = batch(collate, 0)
    losses = []
    for step in range(25):
        b = batch(collate, 8 * (step % 4))
        loss = model(b["input_ids"], b["attention_mask"], b["labels"], pixel_values=b["pixel_values"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            losses.append(model(fixed["input_ids"], fixed["attention_mask"], fixed["labels"],
                                pixel_values=fixed["pixel_values"]).item())
    assert losses[-1] < 0.85 * losses[0], losses
    prompt = word_tokenizer()(["<bos> describe the image :"] * 2, add_special_tokens=False, return_tensors="pt")
    out = model.generate(prompt["input_ids"], prompt["attention_mask"], pixel_values=fixed["pixel_values"][:2],
                         max_new_tokens=4, do_sample=False, pad_token_id=0)
    text = word_tokenizer().batch_decode(out, skip_special_tokens=True)
    assert len(text) == 2 and all(isinstance(t, str) for t in text)


def test_cached_features_give_the_same_loss(parts):
    tower, llm, config = parts
    model = VisionLanguageModel(tower, VPG(config), llm).eval()
    b = batch(CaptionCollator(word_tokenizer()), 0, size=3)
    features = tower_features(tower, b["pixel_values"])
    with torch.no_grad():
        torch.testing.assert_close(model(b["input_ids"], b["attention_mask"], b["labels"], image_features=features),
                                   model(b["input_ids"], b["attention_mask"], b["labels"],
                                         pixel_values=b["pixel_values"]))


def test_mismatched_parts_are_reported(parts):
    tower, llm, config = parts
    wrong = VPGConfig(config.qformer, num_query_tokens=4, llm_hidden_size=80)
    with pytest.raises(ValueError, match="the VPG projects to 80 but the LLM's hidden size is 64"):
        VisionLanguageModel(tower, VPG(wrong), llm)
    with pytest.raises(ValueError, match="emits 96-wide features but the VPG reads 40"):
        VisionLanguageModel(tower, VPG(VPGConfig(QFormerConfig(hidden_size=32, num_layers=1, num_heads=2,
                                                               encoder_hidden_size=40), 4, 64)), llm)
    with pytest.raises(ValueError, match="the tokenizer has 200 tokens but the LLM embeds only 97"):
        VisionLanguageModel(tower, VPG(config), llm, tokenizer=list(range(200)))
    with pytest.raises(ValueError, match="connector must be one of"):
        VisionLanguageModel(tower, VPG(config), llm, connector="prefix")
    model = VisionLanguageModel(tower, VPG(config), llm)
    with pytest.raises(ValueError, match="exactly one of pixel_values and image_features"):
        model.visual_prompts()


def tiny_t5(vocab_size: int = 97):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=vocab_size, d_model=64, d_ff=72, d_kv=16, num_layers=2, num_decoder_layers=1,
                      num_heads=3, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=2,
                      decoder_start_token_id=0, dropout_rate=0.0)
    return T5ForConditionalGeneration(config).eval()


@pytest.mark.parametrize("parts", ["llama"], indirect=True)  # the T5 replaces the fixture's LLM
def test_encoder_decoder_llm_reads_the_prompts_in_its_encoder(parts):
    """T5 as BLIP-2 feeds FlanT5: [visual prompts][prompt + eos] in the encoder, the caption scored in
    the decoder; the loss equals HF's own on the same inputs, sums over num_items_in_batch, and
    generate returns the decoder's new tokens."""
    tower, _, config = parts
    llm = tiny_t5()
    model = VisionLanguageModel(tower, VPG(config), llm, tokenizer=word_tokenizer()).eval()
    collate = CaptionCollator(word_tokenizer(), prompt="describe the image :", encoder_decoder=True)
    b = batch(collate, 0, size=3)
    assert (b["input_ids"][:, -1] == word_tokenizer().eos_token_id).all()  # prompt + eos, no caption
    with torch.no_grad():
        loss = model(b["input_ids"], b["attention_mask"], b["labels"], pixel_values=b["pixel_values"])
        prompts = model.visual_prompts(pixel_values=b["pixel_values"])
        embeds = torch.cat([prompts, llm.get_input_embeddings()(b["input_ids"])], dim=1)
        mask = torch.cat([torch.ones(3, prompts.shape[1], dtype=torch.long), b["attention_mask"]], dim=1)
        expected = llm(inputs_embeds=embeds, attention_mask=mask, labels=b["labels"]).loss
        summed = model(b["input_ids"], b["attention_mask"], b["labels"], pixel_values=b["pixel_values"],
                       num_items_in_batch=1)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(summed, expected * model.labelled_tokens(b["labels"]))
    out = model.generate(b["input_ids"], b["attention_mask"], pixel_values=b["pixel_values"], max_new_tokens=4,
                         do_sample=False)
    full = llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert (full[:, 0] == llm.config.decoder_start_token_id).all() and out.shape == (3, full.shape[1] - 1)
    torch.testing.assert_close(out, full[:, 1:])
    with pytest.raises(TypeError, match="does not support model_type 't5'"):
        VisionLanguageModel(tower, VPG(config), tiny_t5(), connector="memory")


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_a_half_precision_llm_trains_a_float32_vpg(parts, dtype):
    tower, llm, config = parts
    model = VisionLanguageModel(tower, VPG(config), llm, llm_dtype=dtype, connector="memory", mma={"rank": 4})
    frozen = {p.dtype for n, p in model.llm.named_parameters() if not n.startswith("vlfast_")}
    trained = {p.dtype for p in [*model.vpg.parameters(), *(p for m in model.llm_patches() for p in m.parameters())]}
    assert frozen == {LLM_DTYPES[dtype]} and trained == {torch.float32}
    b = batch(CaptionCollator(word_tokenizer()), 0, size=3)
    loss = model(b["input_ids"], b["attention_mask"], b["labels"], pixel_values=b["pixel_values"])
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None and p.grad.dtype == torch.float32
                                        for p in model.vpg.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="llm_dtype must be one of"):
        VisionLanguageModel(tower, VPG(config), llm, llm_dtype="int8")


@pytest.mark.parametrize("connector", ["input", "memory"])
def test_labelled_tokens_are_what_the_loss_scores(parts, connector):
    """With no bos and no prompt the first caption token is scored after soft prompts but not by the
    memory connector's plain causal LM: the summed loss over labelled_tokens is the mean loss."""
    tower, llm, config = parts
    tokenizer = word_tokenizer()
    tokenizer.bos_token = None
    model = VisionLanguageModel(tower, VPG(config), llm, connector=connector).eval()
    b = batch(CaptionCollator(tokenizer), 0, size=3)
    assert (b["labels"][:, 0] != -100).all()
    with torch.no_grad():
        mean = model(b["input_ids"], b["attention_mask"], b["labels"], pixel_values=b["pixel_values"])
        summed = model(b["input_ids"], b["attention_mask"], b["labels"], pixel_values=b["pixel_values"],
                       num_items_in_batch=model.labelled_tokens(b["labels"]))
    torch.testing.assert_close(summed, mean)


def test_length_groups_leave_the_fewest_padded_positions():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        lengths = torch.randint(1, 12, (int(torch.randint(1, 30, (1,), generator=generator)),), generator=generator)
        mask = (torch.arange(12) < lengths[:, None]).long()
        groups = length_groups(mask, most=3)
        assert sorted(torch.cat(groups).tolist()) == list(range(len(lengths)))
        padded = sum(len(rows) * int(lengths[rows].max()) for rows in groups)
        ordered = sorted(lengths.tolist())  # brute force: every cut of the sorted lengths into at most 3 groups
        best = min(sum((b - a) * ordered[b - 1] for a, b in zip((0, *cuts), (*cuts, len(ordered)), strict=True)
                       if b > a)
                   for cuts in itertools.combinations_with_replacement(range(len(ordered) + 1), 2))
        assert len(groups) <= 3 and padded == best


@pytest.mark.parametrize("connector, mma", [("input", None), ("memory", None), ("input", {"rank": 4})])
def test_rows_run_in_length_groups_as_one_padded_batch(parts, connector, mma, monkeypatch):
    """The loss and every trained gradient are those of the whole padded batch run at once."""
    tower, llm, config = parts
    torch.manual_seed(0)
    model = VisionLanguageModel(tower, VPG(config), llm, connector=connector, mma=mma, tokenizer=word_tokenizer())
    collate = CaptionCollator(word_tokenizer())
    captions = ["a red circle", "a circle", "red", "a red circle a circle", "circle", "a red red circle"]
    prompts = ["describe the image :", "", "the image :", "", "describe :", "image"]
    b = collate.tokenize(captions, prompts)
    pixels = batch(collate, 0, size=len(captions))["pixel_values"]
    assert len(vlm.length_groups(b["attention_mask"])) > 1

    def loss_and_gradients():
        model.zero_grad()
        loss = model(b["input_ids"], b["attention_mask"], b["labels"], pixel_values=pixels)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    grouped, grouped_gradients = loss_and_gradients()
    monkeypatch.setattr(vlm, "length_groups", lambda mask: [torch.arange(len(mask))])
    whole, gradients = loss_and_gradients()
    torch.testing.assert_close(grouped, whole)
    assert grouped_gradients.keys() == gradients.keys() and len(gradients) > 4
    for name, gradient in gradients.items():
        torch.testing.assert_close(grouped_gradients[name], gradient, msg=name)



def test_a_left_padded_batch_runs_whole(parts, monkeypatch):
    """Cut to a group's longest row, left-padded rows would lose their tokens: such a batch runs at once."""
    tower, llm, config = parts
    torch.manual_seed(0)
    model = VisionLanguageModel(tower, VPG(config), llm, tokenizer=word_tokenizer())
    collate = CaptionCollator(word_tokenizer())
    b = collate.tokenize(["a red circle", "a circle", "red", "a red circle a circle"],
                         ["describe the image :", "", "the image :", ""])
    lengths = b["attention_mask"].sum(dim=1)
    left = {name: torch.stack([row.roll(int(row.numel() - n)) for row, n in zip(t, lengths, strict=True)])
            for name, t in b.items()}  # each row's padding moved to its left
    assert not torch.equal(left["attention_mask"], b["attention_mask"])
    pixels = batch(collate, 0, size=4)["pixel_values"]
    grouped = model(left["input_ids"], left["attention_mask"], left["labels"], pixel_values=pixels)
    monkeypatch.setattr(vlm, "length_groups", lambda mask: [torch.arange(len(mask))])
    whole = model(left["input_ids"], left["attention_mask"], left["labels"], pixel_values=pixels)
    torch.testing.assert_close(grouped, whole)
