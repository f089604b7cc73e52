"""What the MemVP and MMA patchers share: attaching a trainable module to a frozen LLM and taking it off again.

A patch of kind `k` lives at `model.vlfast_<k>` (so it is saved and loaded with the model's state dict); its
`_Patch` record, at `model.vlfast_<k>.patch`, holds what the revert undoes and is not part of the state dict.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

KINDS = {"memvp": "MemVP", "mma": "MMA"}  # kind -> its name in messages


@dataclass
class _Patch:
    handles: list[RemovableHandle] = field(default_factory=list)
    requires_grad: dict[str, bool] = field(default_factory=dict)  # the LLM's flags before the patch froze it
    merged_originals: dict[str, Tensor | None] = field(default_factory=dict)  # merge_mma: projections before the fold


def _attribute(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {tuple(KINDS)}, got {kind!r}")
    return f"vlfast_{kind}"


def is_patched(model: nn.Module, kind: str) -> bool:
    """Whether `model` carries a patch of `kind` ("memvp" or "mma")."""
    return hasattr(model, _attribute(kind))


def patch_module(model: nn.Module, kind: str) -> nn.Module:
    """The trainable module a patch of `kind` added to `model`."""
    if not is_patched(model, kind):
        raise ValueError(f"this model has no {KINDS[kind]} patch: call vlfast.patch.apply_{kind} first")
    return getattr(model, _attribute(kind))


def _other_patches(model: nn.Module, kind: str) -> list[nn.Module]:
    return [patch_module(model, other) for other in KINDS if other != kind and is_patched(model, other)]


def attach(model: nn.Module, kind: str, build: Callable[[], nn.Module]) -> tuple[nn.Module, _Patch]:
    """Freeze the LLM (remembering its requires_grad flags) and add `build()` to it as the patch of `kind`, on the
    model's device and in its train/eval mode. The caller registers its hooks into the returned record."""
    if is_patched(model, kind):
        raise ValueError(f"apply_{kind}: this model already has {KINDS[kind]}; call revert_{kind} first")
    module = build().to(next(model.parameters()).device).train(model.training)
    others = _other_patches(model, kind)
    # With another patch on, the LLM is already frozen: its flags from before that patch are the ones to keep, and
    # that patch's own parameters stay trainable.
    flags = dict(others[0].patch.requires_grad) if others else {n: p.requires_grad for n, p in model.named_parameters()}
    for name, param in model.named_parameters():
        if name in flags:
            param.requires_grad_(False)
    patch = _Patch(requires_grad=flags)
    module.patch = patch
    model.add_module(_attribute(kind), module)
    return module, patch


def remove_hooks(patch: _Patch) -> None:
    for handle in patch.handles:
        handle.remove()
    patch.handles.clear()


def detach(model: nn.Module, kind: str) -> None:
    """Undo `attach` and the hooks: the module goes, and once no patch is left the LLM's requires_grad flags
    come back (in either order of reverts)."""
    module = patch_module(model, kind)
    remove_hooks(module.patch)
    delattr(model, _attribute(kind))
    if not _other_patches(model, kind):
        for name, param in model.named_parameters():
            param.requires_grad_(module.patch.requires_grad[name])
