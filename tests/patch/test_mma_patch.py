"""apply_mma / merge_mma / revert_mma on a tiny model of every supported LLM family."""
from __future__ import annotations

import pytest
import torch

from tests.tiny_models import TINY_MODELS, assert_unchanged, logits, snapshot, tokens
from vlfast.patch import apply_mma, is_patched, merge_mma, modality, revert_mma, set_modality
from vlfast.patch.families import family


@pytest.fixture(params=list(TINY_MODELS))
def model(request):
    return TINY_MODELS[request.param]()


def randomise_up_projections(mma, std=0.3):
    with torch.no_grad():
        for adapter in mma.adapters:
            adapter.up_blocks.normal_(std=std)
            adapter.up_bias.normal_(std=std)


def test_logits_equal_original_at_init(model):
    ids = tokens()
    before = logits(model, ids)
    apply_mma(model)
    assert is_patched(model, "mma") and not is_patched(model, "memvp")
    with modality(model, ["image", "text"]):
        torch.testing.assert_close(logits(model, ids), before, rtol=0, atol=0)


def test_training_step_updates_only_adapter_parameters(model):
    mma = apply_mma(model, dropout_p=0.1)
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("vlfast_mma")}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in mma.parameters()}
    before = {n: p.detach().clone() for n, p in mma.named_parameters()}
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ids = tokens()
    set_modality(model, ["image", "text"])
    for _ in range(2):  # up projections start at 0: the router and embeddings move from the 2nd step
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for name, p in mma.named_parameters():
        assert not torch.equal(p, before[name]), name
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name


def test_up_projections_are_grouped(model):
    mma = apply_mma(model, rank=8, groups=2)
    randomise_up_projections(mma)
    dense = mma.adapters[0].up_weight()  # (E, D, R)
    half = model.config.hidden_size // 2
    assert dense.shape == (2, 2 * half, 8)
    assert dense[:, :half, 4:].abs().max() == 0 and dense[:, half:, :4].abs().max() == 0
    assert dense[:, :half, :4].abs().min() > 0


def test_routing_differs_by_modality(model):
    mma = apply_mma(model)
    randomise_up_projections(mma)
    with torch.no_grad():
        mma.modality_embedding.weight.normal_(std=5.0)
    ids = tokens(batch=1).repeat(2, 1)
    with modality(model, ["image", "text"]):
        out = logits(model, ids)
    assert not torch.allclose(out[0], out[1], atol=1e-4)
    with modality(model, ["text", "text"]):
        out = logits(model, ids)
    torch.testing.assert_close(out[0], out[1])


def test_revert_restores_the_original_exactly(model):
    model.get_input_embeddings().requires_grad_(False)  # a mix of flags, which revert must bring back
    ids = tokens()
    before, state = logits(model, ids), snapshot(model)
    mma = apply_mma(model)
    randomise_up_projections(mma)
    assert not torch.allclose(logits(model, ids), before)
    revert_mma(model)
    assert not is_patched(model, "mma")
    assert_unchanged(model, state)
    torch.testing.assert_close(logits(model, ids), before, rtol=0, atol=0)


@pytest.mark.parametrize("which", ["image", "text"])
def test_merged_equals_unmerged_and_reverts(model, which):
    ids = tokens()
    original, state = logits(model, ids), snapshot(model)
    mma = apply_mma(model)
    randomise_up_projections(mma)
    with torch.no_grad():
        mma.modality_embedding.weight.normal_(std=3.0)
    with modality(model, [which, which]):
        adapted = logits(model, ids)
    merge_mma(model, which)
    row = family(model)
    assert all(not attention._forward_pre_hooks for attention in row.modules(model, row.attention))
    merged = logits(model, ids)
    torch.testing.assert_close(merged, adapted, atol=2e-5, rtol=2e-5)
    assert not torch.allclose(merged, original, atol=1e-3)
    with pytest.raises(ValueError, match="already merged"):
        merge_mma(model, which)
    revert_mma(model)
    assert_unchanged(model, state)
    torch.testing.assert_close(logits(model, ids), original, rtol=0, atol=0)


def test_generate_with_adapters(model):
    mma = apply_mma(model)
    randomise_up_projections(mma, std=1.0)
    with torch.no_grad():
        mma.modality_embedding.weight.normal_(std=5.0)
    ids = tokens(batch=2, length=4)

    def generate(**kwargs):
        return model.generate(ids, max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True,
                              **kwargs)

    plain = generate()  # no modality set: text
    with modality(model, ["image", "text"]):
        out = generate()
        assert torch.equal(generate().sequences, out.sequences)
        beams = generate(num_beams=2).sequences
    assert out.sequences.shape == (2, 9) and beams.shape[0] == 2
    # The text sample scores as with no modality set, the image sample does not.
    torch.testing.assert_close(out.scores[0][1], plain.scores[0][1])
    assert not torch.allclose(out.scores[0][0], plain.scores[0][0])


def test_clear_errors():
    model = TINY_MODELS["llama"]()
    with pytest.raises(ValueError, match="call vlfast.patch.apply_mma first"):
        set_modality(model, ["image"])
    with pytest.raises(ValueError, match="groups=3 must divide"):
        apply_mma(model, groups=3)
    assert not is_patched(model, "mma") and all(p.requires_grad for p in model.parameters())
    apply_mma(model)
    with pytest.raises(ValueError, match="already has MMA"):
        apply_mma(model)
    with pytest.raises(ValueError, match="one of \\('image', 'text'\\) per sample, got \\['audio'\\]"):
        set_modality(model, ["audio"])
    with pytest.raises(ValueError, match="must be one of"):
        merge_mma(model, "audio")
