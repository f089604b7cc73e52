"""apply_memvp / revert_memvp on a tiny model of every supported LLM family."""
from __future__ import annotations

import pytest
import torch
from transformers.activations import ACT2FN

from tests.tiny_models import HIDDEN, TINY_MODELS, assert_unchanged, logits, snapshot, tokens
from vlfast.ops import use_backend
from vlfast.patch import apply_memvp, is_patched, revert_memvp, set_visual_memory, visual_memory
from vlfast.patch.families import family

MEMORY = 6


@pytest.fixture(params=list(TINY_MODELS))
def model(request):
    return TINY_MODELS[request.param]()


def test_logits_equal_original_at_init(model):
    ids = tokens()
    before = logits(model, ids)
    apply_memvp(model, MEMORY)
    assert is_patched(model, "memvp") and not is_patched(model, "mma")
    torch.testing.assert_close(logits(model, ids), before, rtol=0, atol=0)
    # Real prompts do change the output (V = z + value_pos); clearing them restores it exactly.
    with visual_memory(model, torch.randn(2, MEMORY - 2, model.config.hidden_size)):
        assert not torch.allclose(logits(model, ids), before)
    torch.testing.assert_close(logits(model, ids), before, rtol=0, atol=0)


def plain_ffn(model, layer, x):
    """What the FFN adds to the residual stream for input x, rebuilt from its weights and the activation the
    family table names (hooked modules are called through .forward, which skips their hooks)."""
    act = ACT2FN[getattr(model.config, family(model).activation)]
    model_type = model.config.model_type
    if model_type == "opt":
        return layer.fc2.forward(act(layer.fc1.forward(x)))
    mlp = layer.mlp
    if model_type == "gpt2":  # eval mode: the mlp's dropout is the identity
        return mlp.c_proj(act(mlp.c_fc(x)))
    if model_type == "gpt_neox":
        return mlp.dense_4h_to_h(act(mlp.dense_h_to_4h(x)))
    if model_type == "phi3":
        gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)
        return mlp.down_proj(up * act(gate))
    out = mlp.down_proj(act(mlp.gate_proj(x)) * mlp.up_proj(x))
    return layer.post_feedforward_layernorm.forward(out) if model_type == "gemma2" else out


def test_branch_matches_the_formula_in_every_layer(model):
    """out = FFN(x) + 0.1 * silu(x (z + key_pos)^T) (z + value_pos) for the FFN input x of every layer."""
    memory = apply_memvp(model, MEMORY, scale=0.1, dropout_p=0.0)
    torch.nn.init.normal_(memory.value_pos, std=0.1)
    prompts = torch.randn(2, 4, model.config.hidden_size)
    row = family(model)
    layers = model.get_submodule(row.layers)
    inputs, outputs = [], []
    hooks = [m.register_forward_pre_hook(lambda m, a: inputs.append(a[0])) for m in row.modules(model, row.ffn_input)]
    hooks += [m.register_forward_hook(lambda m, a, o: outputs.append(o)) for m in row.modules(model, row.ffn_output)]
    with visual_memory(model, prompts):
        logits(model, tokens())
    for hook in hooks:
        hook.remove()
    z = torch.nn.functional.pad(prompts, (0, 0, 0, MEMORY - 4))
    assert len(inputs) == len(outputs) == len(layers) == 2
    with torch.no_grad():
        for layer, x, out in zip(layers, inputs, outputs, strict=True):
            hidden = torch.nn.functional.silu(x.reshape(2, -1, x.shape[-1]) @ (z + memory.key_pos).transpose(1, 2))
            expected = plain_ffn(model, layer, x) + (0.1 * hidden @ (z + memory.value_pos)).reshape(x.shape)
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_training_step_changes_only_new_parameters_and_the_projector(model):
    memory = apply_memvp(model, MEMORY, dropout_p=0.1)
    model.train()
    projector = torch.nn.Linear(12, model.config.hidden_size)
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
    model.get_input_embeddings().requires_grad_(False)  # a mix of flags, which revert must bring back
    ids = tokens()
    before, state = logits(model, ids), snapshot(model)
    memory = apply_memvp(model, MEMORY)
    torch.nn.init.normal_(memory.value_pos)
    set_visual_memory(model, torch.randn(2, 3, model.config.hidden_size))
    assert not torch.allclose(logits(model, ids), before)
    revert_memvp(model)
    assert not is_patched(model, "memvp")
    assert_unchanged(model, state)
    torch.testing.assert_close(logits(model, ids), before, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no MemVP patch"):
        revert_memvp(model)


def test_generate_with_memory(model):
    memory = apply_memvp(model, MEMORY)
    torch.nn.init.normal_(memory.value_pos, std=2.0)
    ids = tokens(batch=2, length=4)
    plain = model.generate(ids, max_new_tokens=6, do_sample=False)
    with visual_memory(model, torch.randn(2, MEMORY, model.config.hidden_size) * 3):
        with use_backend("cpu"):
            steered = model.generate(ids, max_new_tokens=6, do_sample=False)
        assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), steered)
        beams = model.generate(ids, max_new_tokens=6, do_sample=False, num_beams=3)
    assert steered.shape == plain.shape == (2, 10) and beams.shape[0] == 2
    assert not torch.equal(steered, plain)


def test_clear_errors():
    model = TINY_MODELS["llama"]()
    with pytest.raises(ValueError, match="call vlfast.patch.apply_memvp first"):
        set_visual_memory(model, torch.zeros(1, 2, HIDDEN))
    with pytest.raises(ValueError, match="num_memory_tokens must be >= 1"):
        apply_memvp(model, 0)
    assert not is_patched(model, "memvp")
    apply_memvp(model, 4)
    with pytest.raises(ValueError, match="already has MemVP"):
        apply_memvp(model, 4)
    with pytest.raises(ValueError, match="holds num_memory_tokens=4"):
        set_visual_memory(model, torch.zeros(1, 5, HIDDEN))
    with pytest.raises(ValueError, match=rf"shape \(B, <= 4, {HIDDEN}\)"):
        set_visual_memory(model, torch.zeros(1, 2, 10))


def test_dropout_follows_the_models_mode(model):
    memory = apply_memvp(model, MEMORY, dropout_p=0.5)
    torch.nn.init.normal_(memory.value_pos)
    ids, prompts = tokens(), torch.randn(2, MEMORY, model.config.hidden_size)
    with visual_memory(model, prompts):
        assert not memory.training  # the model was in eval mode
        torch.testing.assert_close(logits(model, ids), logits(model, ids), rtol=0, atol=0)
        model.train()
        assert not torch.equal(logits(model, ids), logits(model, ids))
