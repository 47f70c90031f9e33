"""The ``neuron_groups`` keyword: how one call's group names reach the model's `RouteState`.

Two pieces, both installed on the adapted model by `NeuronSelectModel.inject_adapter` and removed on unload:

* `GroupsPreHook`, a forward pre-hook that takes ``neuron_groups`` out of every call (PeftModel's task classes,
  plain PeftModel, a transformers model that loaded the adapter with ``load_adapter``) and sets the route state.
  While DeepSpeed is loaded it also registers the layers' adapter parameters with ZeRO-3 until all are
  (`neuron_peft.distributed.register_zero3_external_parameters`): a layer reads its deltas from ParameterDicts
  that ZeRO-3 would otherwise never gather.
* `ForwardWithGroups`, an instance-level ``forward`` that lists ``neuron_groups`` in the signature, so code that
  inspects ``forward`` (transformers' ``Trainer`` column filter, ``generate``'s kwarg check) accepts it.

Neither needs a PEFT hook: PEFT's ``special_peft_forward_args`` is set per instance inside ``PeftModel.__init__``
(no tuner hook), but nothing needs PEFT to strip the keyword, because the pre-hook takes it out of every call.
"""

from __future__ import annotations

import inspect
import sys

import torch

from ..distributed import register_zero3_external_parameters
from ..errors import RoutingError
from .layer import NeuronSelectLayer
from .routing import RouteState, route_state

GROUPS_ARGUMENT = "neuron_groups"


class GroupsPreHook:
    """Forward pre-hook on the adapted model: takes ``neuron_groups`` out of the call and sets the route state.

    A hook (rather than a PeftModel override) makes the keyword work on every entry point: PeftModel's task
    classes, plain PeftModel, and a transformers model that loaded the adapter with ``load_adapter``.
    """

    def __init__(self, state: RouteState) -> None:
        self.state = state
        self.zero3_done = False  # every adapter parameter is partitioned and registered with ZeRO-3
        self.layers = None  # the model's NeuronSelect layers, found once (reset with zero3_done on a new adapter)

    def __call__(self, module, args, kwargs):
        if not self.zero3_done and "deepspeed" in sys.modules:
            if self.layers is None:
                self.layers = [m for m in module.modules() if isinstance(m, NeuronSelectLayer)]
            self.zero3_done = register_zero3_external_parameters(self.layers)
        groups = kwargs.pop(GROUPS_ARGUMENT, None)
        for fallback in (self.state.call_groups, self.state.context_groups):
            if groups is None:
                groups = fallback
        if groups is not None and not isinstance(groups, str) and torch.is_grad_enabled():
            _check_batch_size(groups, args, kwargs)
        self.state.set(groups)
        self.state.set_packed(module, kwargs)
        return args, kwargs


# the model inputs whose first dimension is the number of samples, in the order they are looked for
_BATCH_INPUTS = ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds")


def _check_batch_size(groups, args: tuple, kwargs: dict) -> None:
    """One group name per sample: a list of another length would route by the wrong samples (or, before this check,
    silently give the language rows no gradient). Only checked when gradients are on: routing changes gradients
    only, and generation (beam search expands the batch) may keep a `route()` block's groups."""
    found = [(k, kwargs[k]) for k in _BATCH_INPUTS if isinstance(kwargs.get(k), torch.Tensor)]
    if not found and args and isinstance(args[0], torch.Tensor):
        found = [("the first positional input", args[0])]
    if not found or found[0][1].dim() < 2:  # no batch axis to compare with (e.g. a single unbatched sample)
        return
    name, tensor = found[0]
    n_groups, batch = len(groups), tensor.shape[0]
    if n_groups != batch:
        raise RoutingError(
            f"neuron_groups has {n_groups} group name(s) but the batch has {batch} samples ({name} has shape "
            f"{tuple(tensor.shape)}); give exactly one group name per sample"
        )


class ForwardWithGroups:
    """Instance-level ``forward`` of an adapted model: the same call, with ``neuron_groups`` in its signature.

    The keyword already works on the adapted model (its forward pre-hook takes it out of every call), but code that
    decides what to pass by *inspecting* ``forward`` did not know it: transformers' ``Trainer`` (default
    ``remove_unused_columns=True``) keeps only dataset columns named like ``forward`` parameters of
    ``peft_model.get_base_model()``, and ``generate`` rejects model kwargs ``forward`` does not declare. Declaring
    the keyword lets a ``neuron_groups`` dataset column survive Trainer's defaults and ``generate(neuron_groups=...)``
    pass. The call itself goes to the model's class ``forward`` (or to the instance-level forward that was there
    before, e.g. accelerate's offloading hook), so behaviour is unchanged.
    """

    def __init__(self, module, previous=None):
        self.module = module
        self.previous = previous  # an instance-level forward installed before us (accelerate hooks), or None
        self.__name__ = "forward"
        self.__doc__ = getattr(type(module).forward, "__doc__", None)

    def _target(self):
        return self.previous if self.previous is not None else type(self.module).forward.__get__(self.module)

    @property
    def __signature__(self) -> inspect.Signature:
        sig = inspect.signature(self._target())
        params = list(sig.parameters.values())
        if GROUPS_ARGUMENT in sig.parameters:
            return sig
        extra = inspect.Parameter(GROUPS_ARGUMENT, inspect.Parameter.KEYWORD_ONLY, default=None)
        var_kw = [i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD]
        params.insert(var_kw[0] if var_kw else len(params), extra)
        return sig.replace(parameters=params)

    def __call__(self, *args, **kwargs):
        groups = kwargs.pop(GROUPS_ARGUMENT, None)
        if groups is not None:  # ``model.forward(...)`` called directly skips the pre-hook: route here instead
            route_state(self.module).set(groups)
        return self._target()(*args, **kwargs)


def declare_groups_argument(model) -> None:
    """List ``neuron_groups`` in ``model.forward``'s signature (idempotent); see `ForwardWithGroups`."""
    current = model.__dict__.get("forward")
    if isinstance(current, ForwardWithGroups):
        return
    model.forward = ForwardWithGroups(model, previous=current)


def undeclare_groups_argument(model) -> None:
    """Undo `declare_groups_argument` (on unload/merge), leaving any forward wrapper installed after ours alone."""
    current = model.__dict__.get("forward")
    if not isinstance(current, ForwardWithGroups):
        return
    if current.previous is not None:
        model.forward = current.previous
    else:
        del model.__dict__["forward"]
