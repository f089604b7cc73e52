"""The family table: every tiny model is covered, the table's sites are right, other models are refused untouched."""
from __future__ import annotations

import pytest
import torch
from transformers import BloomConfig, BloomForCausalLM, LlamaModel

from tests.tiny_models import HIDDEN, TINY_MODELS, assert_unchanged, logits, snapshot, tokens
from vlfast.patch import apply_memvp, apply_mma, is_patched, revert_memvp, revert_mma, visual_memory
from vlfast.patch.families import FAMILIES, family


def test_every_family_has_a_tiny_model():
    assert {TINY_MODELS[name]().config.model_type for name in TINY_MODELS} == set(FAMILIES)


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_attention_reads_its_norm_output(name):
    """The attention_norm column: attention's input is that norm's output (post-LN OPT: the raw residual)."""
    model = TINY_MODELS[name]()
    row = family(model)
    normed, read = [], []
    hooks = [m.register_forward_hook(lambda m, a, o: normed.append(o)) for m in row.modules(model, row.attention_norm)]
    hooks += [m.register_forward_pre_hook(lambda m, a, k: read.append(a[0] if a else k["hidden_states"]),
                                          with_kwargs=True) for m in row.modules(model, row.attention)]
    logits(model, tokens())
    for hook in hooks:
        hook.remove()
    assert len(normed) == len(read) == 2
    post_ln = model.config.model_type == "opt" and not model.config.do_layer_norm_before
    assert all(torch.equal(n, r) != post_ln for n, r in zip(normed, read, strict=True))


@pytest.mark.parametrize("apply", [lambda m: apply_memvp(m, 4), apply_mma], ids=["memvp", "mma"])
def test_unsupported_models_are_refused_untouched(apply):
    torch.manual_seed(0)
    bloom = BloomForCausalLM(BloomConfig(vocab_size=97, hidden_size=HIDDEN, n_layer=2, n_head=4)).eval()
    before = snapshot(bloom)
    with pytest.raises(TypeError, match="model_type 'bloom'.*supported: gemma, gemma2, gpt2, gpt_neox, llama, "
                                        "mistral, opt, phi3, qwen2, qwen3"):
        apply(bloom)
    assert_unchanged(bloom, before)
    assert not is_patched(bloom, "memvp") and not is_patched(bloom, "mma")
    decoder = LlamaModel(TINY_MODELS["llama"]().config)  # a supported model_type, but not the *ForCausalLM
    with pytest.raises(TypeError, match="pass the \\*ForCausalLM"):
        apply(decoder)


@pytest.mark.parametrize("last_first", [True, False])
def test_memvp_and_mma_together_revert_exactly(last_first):
    model = TINY_MODELS["gemma2"]()
    model.get_input_embeddings().requires_grad_(False)
    ids = tokens()
    before, state = logits(model, ids), snapshot(model)
    memory = apply_memvp(model, 4)
    apply_mma(model)
    torch.nn.init.normal_(memory.value_pos)
    with visual_memory(model, torch.randn(2, 4, model.config.hidden_size)):
        assert not torch.allclose(logits(model, ids), before)
    assert {id(p) for p in model.parameters() if p.requires_grad} == {
        id(p) for p in (*memory.parameters(), *model.vlfast_mma.parameters())}
    first, second = (revert_mma, revert_memvp) if last_first else (revert_memvp, revert_mma)
    first(model)  # the LLM stays frozen under the other patch, whose parameters still train
    assert [p for p in model.parameters() if p.requires_grad] == list(model.get_submodule(
        "vlfast_memvp" if last_first else "vlfast_mma").parameters())
    second(model)
    assert_unchanged(model, state)
    torch.testing.assert_close(logits(model, ids), before, rtol=0, atol=0)


def test_is_patched_names_the_kinds():
    with pytest.raises(ValueError, match="kind must be one of \\('memvp', 'mma'\\)"):
        is_patched(TINY_MODELS["llama"](), "lora")
