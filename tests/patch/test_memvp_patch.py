"""apply_memvp / revert_memvp on tiny Llama and OPT models."""
from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from tests.tiny_models import HIDDEN, TINY_MODELS, logits, tokens
from vlfast.ops import use_backend
from vlfast.patch import apply_memvp, revert_memvp, set_visual_memory, visual_memory

MEMORY = 6


@pytest.fixture(params=list(TINY_MODELS))
def model(request):
    return TINY_MODELS[request.param]()


def test_logits_equal_original_at_init(model):
    ids = tokens()
    before = logits(model, ids)
    apply_memvp(model, MEMORY)
    torch.testing.assert_close(logits(model, ids), before, rtol=0, atol=0)
    # Real prompts do change the output (V = z + value_pos); clearing them restores it exactly.
    with visual_memory(model, torch.randn(2, MEMORY - 2, HIDDEN)):
        assert not torch.allclose(logits(model, ids), before)
    torch.testing.assert_close(logits(model, ids), before, rtol=0, atol=0)


def plain_ffn_sites(model):
    """(module reading the FFN input, module whose output gets the branch, the FFN without hooks)."""
    if hasattr(model.model, "layers"):  # Llama
        return [(layer.mlp, layer.mlp, layer.mlp.forward) for layer in model.model.layers]
    return [(layer.fc1, layer.fc2, lambda x, layer=layer: layer.fc2.forward(layer.activation_fn(layer.fc1.forward(x))))
            for layer in model.model.decoder.layers]


def test_branch_matches_the_formula_in_every_layer(model):
    """out = FFN(x) + 0.1 * silu(x (z + key_pos)^T) (z + value_pos) for the FFN input x of every layer."""
    memory = apply_memvp(model, MEMORY, scale=0.1, dropout_p=0.0)
    torch.nn.init.normal_(memory.value_pos, std=0.1)
    prompts = torch.randn(2, 4, HIDDEN)
    sites = plain_ffn_sites(model)
    inputs, outputs = [], []
    hooks = [reads.register_forward_pre_hook(lambda m, a: inputs.append(a[0])) for reads, _, _ in sites]
    hooks += [adds.register_forward_hook(lambda m, a, o: outputs.append(o)) for _, adds, _ in sites]
    with visual_memory(model, prompts):
        logits(model, tokens())
    for hook in hooks:
        hook.remove()
    z = torch.nn.functional.pad(prompts, (0, 0, 0, MEMORY - 4))
    assert len(inputs) == len(outputs) == len(sites) == 2
    with torch.no_grad():
        for (_, _, plain), x, out in zip(sites, inputs, outputs, strict=True):
            x3 = x.reshape(2, -1, HIDDEN)
            hidden = torch.nn.functional.silu(x3 @ (z + memory.key_pos).transpose(1, 2))
            expected = plain(x) + (0.1 * hidden @ (z + memory.value_pos)).reshape(x.shape)
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_training_step_changes_only_new_parameters_and_the_projector(model):
    memory = apply_memvp(model, MEMORY, dropout_p=0.1)
    model.train()
    projector = torch.nn.Linear(12, HIDDEN)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not name.startswith("vlfast_memvp")}
    trainable = [p for p in model.parameters() if p.requires_grad] + list(projector.parameters())
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(memory.key_pos), id(memory.value_pos)}
    before = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ids = tokens()
    for _ in range(2):  # value_pos starts at 0: the projector's gradient appears from the 2nd step
        set_visual_memory(model, projector(torch.randn(2, 5, 12)) * 0.01)
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert memory.prompts is not None and projector.weight.grad is not None
    assert projector.weight.grad.abs().max() > 0
    for p, b in zip(trainable, before, strict=True):
        assert not torch.equal(p, b)
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name


def test_revert_restores_the_original_exactly(model):
    ids = tokens()
    before = logits(model, ids)
    names = [n for n, _ in model.state_dict().items()]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    memory = apply_memvp(model, MEMORY)
    torch.nn.init.normal_(memory.value_pos)
    set_visual_memory(model, torch.randn(2, 3, HIDDEN))
    assert not torch.allclose(logits(model, ids), before)
    revert_memvp(model)
    torch.testing.assert_close(logits(model, ids), before, rtol=0, atol=0)
    assert list(model.state_dict()) == names
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    with pytest.raises(ValueError, match="no MemVP patch"):
        revert_memvp(model)


def test_generate_with_memory(model):
    memory = apply_memvp(model, MEMORY)
    torch.nn.init.normal_(memory.value_pos, std=2.0)
    ids = tokens(batch=2, length=4)
    plain = model.generate(ids, max_new_tokens=6, do_sample=False)
    with visual_memory(model, torch.randn(2, MEMORY, HIDDEN) * 3):
        with use_backend("cpu"):
            steered = model.generate(ids, max_new_tokens=6, do_sample=False)
        beams = model.generate(ids, max_new_tokens=6, do_sample=False, num_beams=3)
    assert steered.shape == plain.shape == (2, 10) and beams.shape[0] == 2
    assert not torch.equal(steered, plain)


def test_clear_errors():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50))
    with pytest.raises(TypeError, match="supports LlamaForCausalLM and OPTForCausalLM, got GPT2LMHeadModel"):
        apply_memvp(gpt2, 4)
    model = TINY_MODELS["llama"]()
    with pytest.raises(ValueError, match="call vlfast.patch.apply_memvp first"):
        set_visual_memory(model, torch.zeros(1, 2, HIDDEN))
    apply_memvp(model, 4)
    with pytest.raises(ValueError, match="already has MemVP"):
        apply_memvp(model, 4)
    with pytest.raises(ValueError, match="holds num_memory_tokens=4"):
        set_visual_memory(model, torch.zeros(1, 5, HIDDEN))
    with pytest.raises(ValueError, match=r"shape \(B, <= 4, 64\)"):
        set_visual_memory(model, torch.zeros(1, 2, 10))


def test_dropout_follows_the_models_mode(model):
    memory = apply_memvp(model, MEMORY, dropout_p=0.5)
    torch.nn.init.normal_(memory.value_pos)
    ids, prompts = tokens(), torch.randn(2, MEMORY, HIDDEN)
    with visual_memory(model, prompts):
        assert not memory.training  # the model was in eval mode
        torch.testing.assert_close(logits(model, ids), logits(model, ids), rtol=0, atol=0)
        model.train()
        assert not torch.equal(logits(model, ids), logits(model, ids))
