"""FSDP2 (`fully_shard`) for `--fsdp`: the frozen LLM sharded layer by layer and the trained module
sharded, so that each process holds 1/N of their weights and gathers one layer at a time; and the
conversions between sharded parameters or optimizer states (DTensors) and the full tensors that
checkpoints and saved weights hold, so that they load with any number of processes."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from vlfast.training.distributed import Processes


def decoder_layers(llm: nn.Module) -> list[nn.Module]:
    """The LLM's repeated blocks, as transformers names them for device maps (`_no_split_modules`:
    LlamaDecoderLayer, T5Block, ...); ValueError when it names none."""
    names = set(getattr(llm, "_no_split_modules", None) or ())
    layers = [m for m in llm.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"--fsdp: {type(llm).__name__} names no decoder layers to shard (transformers' "
                         f"_no_split_modules is {sorted(names) or 'empty'})")
    return layers


def shard(llm: nn.Module, trained: nn.Module, processes: Processes) -> None:
    """Shards each decoder layer of the frozen `llm` (under the LLM as their root) and `trained` over
    the processes. The LLM is sharded once: a later run on the same LLM keeps its sharding. The
    LLM's own parameters (embeddings, final norm, head) stay whole on every process, since the
    model calls the input embeddings outside the LLM's forward (where FSDP would not gather them);
    they are a small part of an LLM and frozen, so they need no gradient reduction."""
    mesh = init_device_mesh(processes.device.type, (processes.world,))
    if not isinstance(llm, FSDPModule):
        layers = decoder_layers(llm)
        for layer in layers:
            fully_shard(layer, mesh=mesh)
        in_layers = {id(p) for layer in layers for p in layer.parameters()}
        fully_shard(llm, mesh=mesh, ignored_params={p for p in llm.parameters() if id(p) not in in_layers})
    fully_shard(trained, mesh=mesh)


@contextmanager
def no_sync(module: nn.Module) -> Iterator[None]:
    """Gradients accumulate in each process, unreduced, inside (FSDP's counterpart of DDP's no_sync)."""
    sharded = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for m in sharded:
        m.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for m in sharded:
            m.set_requires_gradient_sync(True, recurse=False)


def reshard(module: nn.Module) -> None:
    """Frees the gathered weights of every sharded part of `module`. FSDP keeps the root's weights
    gathered after a forward pass, for the backward pass that frees them; after a validation, which
    has none, the next step would otherwise run on them as they were (stale once the optimizer has
    stepped, and with the trainable flags of the previous stage)."""
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def full(tensor: Tensor) -> Tensor:
    """The whole tensor of a sharded one (a collective: every process calls it), else `tensor`."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def load_full(parameter: Tensor, value: Tensor) -> None:
    """Copies a full tensor into `parameter`, into this process's shard when it is sharded."""
    with torch.no_grad():
        if isinstance(parameter, DTensor):  # every process holds `value`: each cuts its own shard, no communication
            value = distribute_tensor(value.to(parameter.device, parameter.dtype), parameter.device_mesh,
                                      parameter.placements, src_data_rank=None)
        parameter.copy_(value)


def full_optimizer_state(state: dict) -> dict:
    """An optimizer's state_dict with its sharded states whole (a collective when any is sharded)."""
    return {**state, "state": {index: {k: full(v) for k, v in values.items()}
                               for index, values in state["state"].items()}}


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After load_state_dict of full states: each state of a sharded parameter sharded as it is."""
    for parameter, values in optimizer.state.items():
        if isinstance(parameter, DTensor):
            for k, v in values.items():
                if isinstance(v, Tensor) and not isinstance(v, DTensor) and v.shape == parameter.shape:
                    values[k] = distribute_tensor(v, parameter.device_mesh, parameter.placements, src_data_rank=None)


def full_state(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict with every tensor whole, on the CPU of the main process (gathered one
    tensor at a time; the other processes get an empty dict). Every process calls it."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
