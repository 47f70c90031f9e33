"""Helpers for multi-process use: DDP, FSDP2 (``fully_shard``) and DeepSpeed ZeRO-3.

* DDP needs nothing special: the live path swaps rows into each replica's weight for a layer call only.
* FSDP2: the live path swaps rows into the all-gathered weight FSDP2 hands each call and puts W0 back within the
  call; the DTensor shards are never written. ZeRO-3 partitioned parameters take the additive path.
* `select_neurons` all-reduces its score accumulators (`all_reduce_sum`), so every rank selects the same rows;
  on sharded models the ranks step through the calibration batches in lockstep (`needs_lockstep`).
* `gathered_parameters` gathers ZeRO-3 partitioned parameters for reading (weight-based ``neuron_init``), through
  PEFT's ``gather_params_ctx``.
* ZeRO-3 fetches a module's own parameters before its forward, but a NeuronSelect layer reads its deltas from
  ``nn.ParameterDict`` children that are never called. `register_zero3_external_parameters` registers every
  parameter of the layer's adapter dicts (``adapter_layer_names``, whatever they hold) as an external parameter of
  the layer; the adapted model's forward pre-hook calls it before each top-level forward once DeepSpeed is loaded,
  so it also covers parameters partitioned after the adapter was made (``deepspeed.initialize``).
  `full_adapter_tensors` gathers partitioned deltas for ``save_pretrained``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence

import torch
from torch import nn


def is_distributed() -> bool:
    """Whether torch.distributed is initialised with more than one process."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and world_size() > 1


def world_size() -> int:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1
    return torch.distributed.get_world_size()


def rank() -> int:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 0
    return torch.distributed.get_rank()


def _collective_device() -> torch.device:
    """CPU for gloo (and mixed cpu:gloo backends), the current accelerator for NCCL-only process groups."""
    backend = str(torch.distributed.get_backend()).lower()
    if "nccl" in backend and "gloo" not in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensors: Sequence[torch.Tensor], dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    """Element-wise sums over all processes of `tensors` (one collective), each returned in its own dtype/device.

    Without an initialised multi-process group the tensors are returned unchanged. Sums are taken in `dtype`
    (float64: exact for the counts, and the order of addition barely matters for the scores).

    Not ``accelerate.utils.reduce``: it asks accelerate's ``PartialState`` whether the run is distributed, which is
    read from launcher environment variables, not from the process group that exists. In processes started with
    ``torch.multiprocessing.spawn`` + ``init_process_group`` (this project's tests; plain-torch users) it reports
    ``DistributedType.NO`` and returns each rank's own tensor unreduced (checked with 2 gloo processes: sum of
    1 and 2 came back as 1 and 2), so ranks would silently select different rows. Creating ``PartialState`` can also
    initialise a process group as a side effect, and it reduces one collective per tensor instead of one in all.
    """
    tensors = list(tensors)
    if not is_distributed() or not tensors:
        return tensors
    device = _collective_device()
    flat = torch.cat([t.detach().reshape(-1).to(device=device, dtype=dtype) for t in tensors])
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    out, offset = [], 0
    for t in tensors:
        n = t.numel()
        out.append(flat[offset : offset + n].view(t.shape).to(device=t.device, dtype=t.dtype))
        offset += n
    return out


def all_reduce_max(values: Sequence[int]) -> list[int]:
    """Element-wise maxima over all processes of a list of integers (unchanged without a process group)."""
    values = [int(v) for v in values]
    if not is_distributed() or not values:
        return values
    t = torch.tensor(values, dtype=torch.int64, device=_collective_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return [int(v) for v in t.tolist()]


def is_sharded_parameter(p: torch.Tensor) -> bool:
    """A DTensor (FSDP2, tensor parallel) or a DeepSpeed ZeRO-3 partitioned parameter."""
    return hasattr(p, "ds_id") or type(p.data) is not torch.Tensor or type(p).__name__ == "DTensor"


def needs_lockstep(model: nn.Module) -> bool:
    """Whether every rank must run the same number of forwards (sharded parameters gather collectively)."""
    return is_distributed() and any(is_sharded_parameter(p) for p in model.parameters())


@contextlib.contextmanager
def gathered_parameters(params: Iterable[torch.Tensor]):
    """Gather ZeRO-3 partitioned parameters for reading inside the block (a no-op for any other parameter).

    PEFT's ``gather_params_ctx`` (read-only: ``modifier_rank=None``), the helper PEFT's own tuners use. It gathers
    only when transformers' DeepSpeed integration reports ZeRO-3 (``is_deepspeed_zero3_enabled()``); partitioned
    parameters without it (DeepSpeed driven by hand) would be read as empty shards, so that case is an error.
    Tested with DeepSpeed on the CPU (``tests/integrations/test_deepspeed.py`` saves through it).
    """
    from peft.utils.integrations import check_deepspeed_zero3_enabled, gather_params_ctx

    params = [p for p in params if p is not None]
    if any(hasattr(p, "ds_id") for p in params) and not check_deepspeed_zero3_enabled():
        raise RuntimeError(
            "these parameters are partitioned by DeepSpeed ZeRO-3, but transformers' DeepSpeed integration is not "
            "active (transformers.integrations.is_deepspeed_zero3_enabled() is False), so they cannot be gathered: "
            "create the model under Trainer / accelerate with a ZeRO-3 config (or HfDeepSpeedConfig)"
        )
    with gather_params_ctx(params, modifier_rank=None):
        yield


def prepare_for_sharding(model: nn.Module) -> nn.Module:
    """Kept for compatibility; returns ``model`` unchanged.

    Earlier versions kept selected rows written into the base weights between calls and needed this before
    sharding. Rows are now swapped in only for the duration of a layer call, so the base weights always hold W0.
    """
    return model


def _zero3_parameters(layer: nn.Module):
    """Every parameter in the layer's adapter ParameterDicts (``adapter_layer_names``: deltas of any kind)."""
    for attr in getattr(layer, "adapter_layer_names", ()):
        container = getattr(layer, attr, None)
        if isinstance(container, nn.ParameterDict):
            yield from container.values()


def register_zero3_external_parameters(layers: Iterable[nn.Module]) -> bool:
    """Register, for DeepSpeed ZeRO-3, each layer's adapter parameters as external parameters of the layer, so the
    layer's forward (and backward) gathers them; returns whether every adapter parameter is now partitioned and
    registered (the caller can stop checking).

    A no-op returning False when DeepSpeed is not imported (it is never imported here) or no parameter is
    partitioned yet. Idempotent: DeepSpeed keys the registration by parameter identity.
    """
    import sys

    deepspeed = sys.modules.get("deepspeed")
    if deepspeed is None:
        return False
    register = getattr(getattr(deepspeed, "zero", None), "register_external_parameter", None)
    if register is None:
        return False
    layers = list(layers)
    first = next((p for layer in layers for p in _zero3_parameters(layer)), None)
    if first is None or not hasattr(first, "ds_id"):
        return False  # ZeRO-3 partitions every parameter at once: nothing is partitioned yet (the common case)
    complete = True
    for layer in layers:
        for param in _zero3_parameters(layer):
            if not hasattr(param, "ds_id"):
                complete = False
                continue
            if id(param) not in getattr(layer, "_external_params", {}):
                register(layer, param)
    return complete


def full_adapter_tensors(model: nn.Module, to_save: dict) -> dict:
    """`to_save` (adapter state-dict entries) with ZeRO-3 partitioned parameters replaced by their full values.

    Under ZeRO-3 ``state_dict()`` holds each partitioned parameter as an empty placeholder; saving that would write
    (0,)-shaped deltas that cannot be loaded. The full values are gathered collectively (every rank must call
    ``save_pretrained``, as transformers' Trainer does; pass ``is_main_process=rank == 0`` so one rank writes).
    Entries that are not empty placeholders are returned unchanged. A placeholder is what DeepSpeed puts in a
    partitioned parameter's place, ``torch.empty(0, dtype=param.dtype)``: a 1-D floating tensor. Other empty
    tensors are empty in full and saved as they are: the ``(0, in_features)`` row delta of a layer that trains
    columns only, and its empty integer rows buffer (told apart by shape, not by name, so that wrappers such as FSDP,
    whose module names differ from the state-dict keys, do not matter). A placeholder with no partitioned parameter
    behind it is an error, never an empty file.
    """
    empty = [k for k, v in to_save.items() if isinstance(v, torch.Tensor) and v.numel() == 0]
    if not empty:
        return to_save
    # the keys are still the model's parameter names here (PEFT drops the adapter name after this step)
    partitioned = {name: param for name, param in model.named_parameters() if hasattr(param, "ds_id")}
    out = dict(to_save)
    for key in empty:
        param = partitioned.get(key)
        placeholder_shaped = to_save[key].dim() == 1 and to_save[key].is_floating_point()
        if param is None and not placeholder_shaped:
            continue  # empty in full (a columns-only layer's row delta or rows buffer)
        if param is None:
            raise RuntimeError(
                f"NeuronSelect: refusing to save {key!r}: it is empty and no DeepSpeed ZeRO-3 parameter stands behind "
                "it to gather its value from"
            )
        with gathered_parameters([param]):
            out[key] = param.detach().clone().cpu()
    return out
