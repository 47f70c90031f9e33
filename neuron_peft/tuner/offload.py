"""Adapter weights that accelerate offloaded (cpu/disk offload, a ``device_map`` with offloaded layers).

accelerate loads weights only for modules whose forward runs, and a ParameterDict has no forward, so an offloaded
delta sits on the meta device when its layer runs. These helpers load it through the hook accelerate attached to
the ParameterDict, for inference; training an offloaded delta is refused, since it could receive no gradient.
"""

from __future__ import annotations

import torch
from torch import nn


class OffloadedDeltas:
    """Mixed into `NeuronSelectLayer`: the deltas of one adapter ready for compute."""

    def _adapter_tensors(self, adapter_name: str):
        """(delta, bias_delta) ready for compute: deltas that accelerate offloaded to the meta device are loaded
        through the hook accelerate attached to their ParameterDict (accelerate only loads weights for modules whose
        forward runs, and a ParameterDict has none)."""
        delta = self._fast["deltas"][adapter_name]
        bias_delta = self._fast["bias_deltas"].get(adapter_name)
        if delta.device.type != "meta":
            return delta, bias_delta
        _refuse_offloaded_training(delta)
        return (
            _load_offloaded(self.neuron_select_delta, adapter_name),
            None if bias_delta is None else _load_offloaded(self.neuron_select_bias_delta, adapter_name),
        )

    def _adapter_col_tensor(self, adapter_name: str) -> torch.Tensor:
        """The column delta ready for compute (loaded through accelerate's hook when offloaded, as above)."""
        col_delta = self._fast["col_deltas"][adapter_name]
        if col_delta.device.type != "meta":
            return col_delta
        _refuse_offloaded_training(col_delta)
        return _load_offloaded(self.neuron_select_col_delta, adapter_name)


def _refuse_offloaded_training(delta: torch.Tensor) -> None:
    if torch.is_grad_enabled() and delta.requires_grad:
        raise RuntimeError(
            "NeuronSelect: this layer's adapter weights are offloaded to the meta device (accelerate cpu/disk "
            "offload or a device_map with offloaded layers), so they cannot receive gradients; train with the "
            "adapter on a real device, or run inference under torch.no_grad()"
        )


def _load_offloaded(params: nn.ParameterDict, name: str) -> torch.Tensor:
    """The value of an offloaded parameter from accelerate's weights map, on the hook's execution device."""
    hook = getattr(params, "_hf_hook", None)
    hooks = getattr(hook, "hooks", (hook,))  # a SequentialHook holds several
    for h in hooks:
        weights_map = getattr(h, "weights_map", None)
        if weights_map is not None and name in weights_map:
            device = getattr(h, "execution_device", None)
            return weights_map[name].to(device if device is not None else "cpu")
    raise RuntimeError(
        f"NeuronSelect: adapter weight {name!r} is on the meta device and no accelerate offload hook holds its "
        "value; load the adapter onto a real device (or dispatch the model after loading the adapter)"
    )
