"""Checking an adapter file's tensors against the model on load, so a mismatch is an error, never a partial load.

PEFT loads adapter weights with ``strict=False``; `check_adapter_state_dict` (called from the tuner's
``_remap_adapter_state_dict_for_load`` hook, after PEFT's own key remapping) refuses missing tensors, wrong shapes,
out-of-range or changed row indices (`AdapterMismatchError`) and tensors that are not this adapter's
(`AdapterFileError`).
"""

from __future__ import annotations

import contextlib

import torch
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from ..errors import AdapterFileError, AdapterMismatchError
from .layer import NeuronSelectLayer

_TORCH_WRAPPER_NAMES = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


def without_wrapper_names(name: str) -> str:
    """`name` without the levels torch's FSDP and activation-checkpointing wrappers add, at any depth.

    Why: ``named_modules()`` names carry those levels but ``state_dict()`` keys do not (the wrappers strip them), so
    a module name must lose them before it is compared with a key of an adapter file. (PEFT >= 0.22 has the same
    helper, ``remove_torch_wrapper_names``; this one also serves PEFT 0.21.)
    """
    return ".".join(part for part in name.split(".") if part not in _TORCH_WRAPPER_NAMES)


def check_adapter_state_dict(model: nn.Module, adapter_name: str, state_dict: dict) -> dict:
    """Validate the (already remapped) state dict of `adapter_name` against `model`; returns it with int64 rows."""
    refuse_foreign_keys(model, adapter_name, state_dict)
    key_of = {without_wrapper_names(key): key for key in state_dict}  # a module's name -> the file's key
    for module_name, module in model.named_modules():
        if not isinstance(module, NeuronSelectLayer) or adapter_name not in module.neuron_select_indices:
            continue
        name = without_wrapper_names(module_name)
        shown = name.removeprefix("base_model.model.")
        expected = {
            f"{name}.neuron_select_delta.{adapter_name}": module.neuron_select_delta[adapter_name].shape,
            f"{name}.neuron_select_indices.{adapter_name}": module.neuron_select_indices[adapter_name].shape,
        }
        for attr in ("neuron_select_bias_delta", "neuron_select_col_delta", "neuron_select_col_indices"):
            if adapter_name in getattr(module, attr):
                expected[f"{name}.{attr}.{adapter_name}"] = getattr(module, attr)[adapter_name].shape
        for key, shape in expected.items():
            if key not in key_of:
                raise AdapterMismatchError(
                    f"module {shown!r}: adapter file has no tensor {key.rsplit('.', 2)[-2]!r} (incomplete adapter)"
                )
            found = tuple(state_dict[key_of[key]].shape)
            if found != tuple(shape):
                raise AdapterMismatchError(
                    f"module {shown!r}: {key.rsplit('.', 2)[-2]} has shape {found} in the "
                    f"adapter file but {tuple(shape)} in the model (in_features={module.in_features}, "
                    f"out_features={module.out_features})"
                )
        _check_indices(
            state_dict,
            key_of[f"{name}.neuron_select_indices.{adapter_name}"],
            module.neuron_select_indices[adapter_name],
            module.out_features,
            shown,
            "row",
            "output rows",
        )
        if adapter_name in module.neuron_select_col_indices:
            _check_indices(state_dict, key_of[f"{name}.neuron_select_col_indices.{adapter_name}"],
                           module.neuron_select_col_indices[adapter_name], module.in_features, shown, "column",
                           "input columns")  # fmt: skip
    return state_dict


def _check_indices(state_dict: dict, key: str, expected: torch.Tensor, size: int, shown: str, unit: str,
                   what: str) -> None:  # fmt: skip
    """The file's row (or column) indices lie in the layer and equal the config's; stored back as int64."""
    indices = state_dict[key]
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= size):
        raise AdapterMismatchError(
            f"module {shown!r}: adapter {unit} index {int(indices.max())} out of range for {size} {what}"
        )
    if not torch.equal(indices.cpu().long(), expected.cpu()):
        raise AdapterMismatchError(
            f"module {shown!r}: {unit} indices in the adapter file differ from adapter_config.json"
        )
    state_dict[key] = indices.long()


def refuse_foreign_keys(model: nn.Module, adapter_name: str, state_dict: dict) -> None:
    """Refuse tensors that are not this adapter's: PEFT loads with ``strict=False``, so without this check a base
    weight in the file (``model.norm.weight``, ``q_proj.base_layer.weight``) silently overwrites the base model
    and another method's tensors (a LoRA file whose peft_type was edited) are silently ignored.

    Allowed, exactly what PEFT itself writes for this adapter: the NeuronSelect tensors, the modules PEFT's
    auxiliary wrappers save (``modules_to_save``, trainable tokens), and the input/output embedding layers that
    PEFT saves when the vocabulary was resized or ``lm_head`` is targeted (``save_embedding_layers``).
    """
    peft_prefix = "base_model.model."

    def plain(key: str) -> str:
        return without_wrapper_names(key).removeprefix(peft_prefix)

    allowed: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, NeuronSelectLayer) and adapter_name in module.neuron_select_indices:
            for attr in ("neuron_select_delta", "neuron_select_indices", "neuron_select_bias_delta",
                         "neuron_select_col_delta", "neuron_select_col_indices"):  # fmt: skip
                if adapter_name in getattr(module, attr):
                    allowed.add(plain(f"{name}.{attr}.{adapter_name}"))
        elif isinstance(module, AuxiliaryTrainingWrapper):
            allowed.update(plain(f"{name}.{k}") for k in module.adapter_state_dict_load_map(adapter_name).values())
    embedding_layers = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        with contextlib.suppress(AttributeError, NotImplementedError):
            embedding_layers.append(getattr(model, getter)())
    embedding_ids = {id(layer) for layer in embedding_layers if layer is not None}
    embedding_prefixes = tuple(plain(f"{n}.") for n, m in model.named_modules() if id(m) in embedding_ids)
    foreign = sorted(
        key
        for key in state_dict
        if plain(key) not in allowed and not (embedding_prefixes and plain(key).startswith(embedding_prefixes))
    )
    if foreign:
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        shown = ", ".join(repr(plain(k)) for k in foreign[:5]) + more
        raise AdapterFileError(
            f"adapter file for adapter {adapter_name!r} holds {len(foreign)} tensor(s) that are not NeuronSelect "
            f"tensors of this model (base-model weights or another method's tensors): {shown}. Refusing to load "
            "it: PEFT would silently overwrite the base weights with them or ignore them."
        )
