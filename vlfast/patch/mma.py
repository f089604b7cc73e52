"""LaVIN's mixture-of-modality adapters (MMA) for Hugging Face causal LMs.

    apply_mma(model)                       # a routed adapter before attention in every layer; freezes the LLM
    with modality(model, ["image", "text"]):
        loss = model(input_ids, labels=labels).loss
    merge_mma(model, "image")              # fold the adapters into q/k/v for one modality: no adapter cost
    revert_mma(model)                      # the original model, exactly (also after merge_mma)

Every layer's attention sees `adapter(norm(x))` instead of `norm(x)` (SPEC.md section 5):
`routed_adapter` with a D -> rank down projection, `num_experts` up projections rank -> D grouped
block-diagonally (`groups` blocks, each half of the output uses its half of the hidden units when
groups = 2), zero-initialised so that the patched model starts equal to the original, and a router
Linear(D, num_experts) per layer driven by a learned modality embedding (image or text) that the
caller selects per sample (text when none is selected). Attached with a forward pre-hook on each
layer's attention module (vlfast.patch.families): the LLM's modules and weights are not replaced.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from vlfast.ops import routed_adapter
from vlfast.patch.base import attach, detach, patch_module, remove_hooks
from vlfast.patch.families import Family, family

MODALITIES = ("image", "text")


class RouterAdapter(nn.Module):
    """One layer's adapter: down projection, grouped expert up projections, router."""

    def __init__(self, hidden: int, rank: int, groups: int, num_experts: int) -> None:
        super().__init__()
        if hidden % groups or rank % groups:
            raise ValueError(f"groups={groups} must divide the hidden size {hidden} and the rank {rank}")
        self.groups = groups
        self.down = nn.Linear(hidden, rank)
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        # Expert e's up projection is block-diagonal: block g maps hidden units g to output slice g.
        self.up_blocks = nn.Parameter(torch.zeros(num_experts, groups, hidden // groups, rank // groups))
        self.up_bias = nn.Parameter(torch.zeros(num_experts, hidden))
        self.router = nn.Linear(hidden, num_experts)

    def up_weight(self) -> Tensor:
        """The experts' dense (E, D, R) up projections."""
        return torch.stack([torch.block_diag(*expert) for expert in self.up_blocks])

    def forward(self, x: Tensor, router_input: Tensor, *, temperature: float, scale: float,
                dropout_p: float) -> Tensor:
        dtype = x.dtype
        return routed_adapter(
            x, router_input.to(dtype), self.router.weight.to(dtype), self.router.bias.to(dtype),
            self.down.weight.to(dtype), self.down.bias.to(dtype), self.up_weight().to(dtype), self.up_bias.to(dtype),
            temperature=temperature, scale=scale, dropout_p=dropout_p)

    def as_affine(self, router_input: Tensor, *, temperature: float, scale: float) -> tuple[Tensor, Tensor]:
        """(A, c) with adapter(x) = x A^T + c for one router input (D,), without dropout."""
        weights = torch.softmax(self.router(router_input) / temperature, dim=-1)  # (E,)
        mixed_up = torch.einsum("e,edr->dr", weights, self.up_weight())
        mixed_bias = weights @ self.up_bias
        eye = torch.eye(mixed_up.shape[0], dtype=mixed_up.dtype, device=mixed_up.device)
        return eye + scale * mixed_up @ self.down.weight, scale * (mixed_up @ self.down.bias + mixed_bias)


class MixtureOfModalityAdapters(nn.Module):
    """All layers' adapters, the modality embeddings, and the modality of the current batch."""

    def __init__(self, hidden: int, num_layers: int, *, rank: int, groups: int, num_experts: int,
                 temperature: float, scale: float, dropout_p: float) -> None:
        super().__init__()
        self.adapters = nn.ModuleList(RouterAdapter(hidden, rank, groups, num_experts) for _ in range(num_layers))
        self.modality_embedding = nn.Embedding(len(MODALITIES), hidden)
        nn.init.normal_(self.modality_embedding.weight, std=0.02)
        self.temperature, self.scale, self.dropout_p = temperature, scale, dropout_p
        self.modality: Tensor | None = None  # (B,) indices into MODALITIES; None: text

    def set_modality(self, modality: Sequence[str] | Tensor | None) -> None:
        if modality is None or isinstance(modality, Tensor):
            self.modality = modality
            return
        unknown = sorted(set(modality) - set(MODALITIES))
        if unknown:
            raise ValueError(f"modality must name one of {MODALITIES} per sample, got {unknown}")
        self.modality = torch.tensor([MODALITIES.index(m) for m in modality],
                                     device=self.modality_embedding.weight.device)

    def router_inputs(self, batch: int) -> Tensor:
        modality = self.modality
        if modality is None:
            modality = torch.full((1,), MODALITIES.index("text"), device=self.modality_embedding.weight.device)
        if batch % modality.shape[0]:
            raise ValueError(f"{modality.shape[0]} modalities were set for a batch of {batch}")
        # Generation may repeat each sample (beams) contiguously.
        return self.modality_embedding(modality.repeat_interleave(batch // modality.shape[0]))

    def adapt(self, layer: int, x: Tensor) -> Tensor:
        return self.adapters[layer](x, self.router_inputs(x.shape[0]), temperature=self.temperature,
                                    scale=self.scale, dropout_p=self.dropout_p if self.training else 0.0)


def apply_mma(model: nn.Module, *, rank: int = 8, groups: int = 2, num_experts: int = 2, temperature: float = 10.0,
              scale: float = 1.0, dropout_p: float = 0.1) -> MixtureOfModalityAdapters:
    """Add a routed adapter before attention in every layer; freeze the LLM. Returns the new
    trainable module (also at `model.vlfast_mma`)."""
    row = family(model)
    attentions = row.modules(model, row.attention)
    mma, patch = attach(model, "mma", lambda: MixtureOfModalityAdapters(
        model.config.hidden_size, len(attentions), rank=rank, groups=groups, num_experts=num_experts,
        temperature=temperature, scale=scale, dropout_p=dropout_p))
    for index, attention in enumerate(attentions):
        def adapt_input(module, args, kwargs, index=index):
            if args:
                return (mma.adapt(index, args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": mma.adapt(index, kwargs["hidden_states"])}

        patch.handles.append(attention.register_forward_pre_hook(adapt_input, with_kwargs=True))
    return mma


def set_modality(model: nn.Module, modality: Sequence[str] | Tensor | None) -> None:
    """The modality of each sample of the next batches ('image' or 'text'); None: text."""
    patch_module(model, "mma").set_modality(modality)


@contextlib.contextmanager
def modality(model: nn.Module, modalities: Sequence[str] | Tensor | None) -> Iterator[None]:
    mma = patch_module(model, "mma")
    previous = mma.modality
    mma.set_modality(modalities)
    try:
        yield
    finally:
        mma.modality = previous


def _projections(model: nn.Module, row: Family) -> Iterator[tuple[int, str, nn.Module]]:
    """(layer, '<layer>.<name>', module) for every layer's attention input projections."""
    for layer, attention in enumerate(row.modules(model, row.attention)):
        for name in row.projections:
            yield layer, f"{layer}.{name}", attention.get_submodule(name)


@torch.no_grad()
def merge_mma(model: nn.Module, modality_name: str) -> None:
    """Fold every layer's adapter, for one modality, into its attention's input projections and remove
    the hooks: inference then costs nothing extra. With adapter(x) = x A^T + c and a projection
    y = x W + b (W stored [in, out]): W <- A^T W, b <- c W + b. revert_mma still restores the original weights."""
    mma = patch_module(model, "mma")
    if modality_name not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality_name!r}")
    if mma.patch.merged_originals:
        raise ValueError("merge_mma: the adapters are already merged")
    row = family(model)
    router_input = mma.modality_embedding.weight[MODALITIES.index(modality_name)]
    affines = [adapter.as_affine(router_input, temperature=mma.temperature, scale=mma.scale)
               for adapter in mma.adapters]
    remove_hooks(mma.patch)
    for layer, key, proj in _projections(model, row):
        affine, shift = affines[layer]
        mma.patch.merged_originals[key + ".weight"] = proj.weight.detach().clone()
        mma.patch.merged_originals[key + ".bias"] = None if proj.bias is None else proj.bias.detach().clone()
        weight = proj.weight.float() if row.projections_in_out else proj.weight.float().T  # [in, out]
        folded = affine.T @ weight
        bias = shift @ weight + (0.0 if proj.bias is None else proj.bias.float())
        proj.weight.copy_(folded if row.projections_in_out else folded.T)
        if proj.bias is None:
            proj.bias = nn.Parameter(bias.to(proj.weight.dtype), requires_grad=False)
        else:
            proj.bias.copy_(bias)


@torch.no_grad()
def revert_mma(model: nn.Module) -> None:
    """Remove the adapters (merged or not) and restore the LLM's weights and requires_grad flags."""
    mma = patch_module(model, "mma")
    originals = mma.patch.merged_originals
    if originals:
        for _, key, proj in _projections(model, family(model)):
            proj.weight.copy_(originals[key + ".weight"])
            if originals[key + ".bias"] is None:
                proj.bias = None  # merge_mma added it
            else:
                proj.bias.copy_(originals[key + ".bias"])
    detach(model, "mma")
