"""`NeuronSelectModel`: the PEFT tuner that swaps targeted Linear layers for NeuronSelect layers.

It resolves which rows each layer trains (explicit rows from the config, else `neuron_ratio` rows picked by
`neuron_init`), writes picked rows back into the config so a saved adapter never re-selects, rejects rows that do
not fit the model, and validates adapter files on load so a mismatch is an error, never a partial load.
"""

from __future__ import annotations

import contextlib
import warnings
import zlib
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import (
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    get_quantization_kwargs,
)
from torch import nn

from ..distributed import full_adapter_tensors
from ..errors import AdapterMismatchError, NonFiniteDeltaError
from .adapter_file import check_adapter_state_dict
from .config import NeuronSelectConfig, _check_rows
from .groups_keyword import GroupsPreHook, declare_groups_argument, undeclare_groups_argument
from .layer import Linear, NeuronSelectLayer, linear_features
from .model_card import take_summary
from .peft_type import PREFIX
from .routing import RouteState
from .summary import selection_summary
from .unit_choice import _flatten_units, _out_features, _weight_rows, pick_rows
from .unsupported import UnsupportedPeftMethods

_ALLOW_NONFINITE = "_neuron_select_allow_nonfinite"


@contextlib.contextmanager
def allow_nonfinite(model: nn.Module):
    """Let ``save_pretrained`` and merging accept NaN/Inf deltas of `model` inside this block.

    By default both refuse with `NonFiniteDeltaError` naming the parameter, because a NaN written into an adapter
    file or merged into base weights is silent until someone uses it. Use this to keep a diverged run for
    inspection::

        with neuron_peft.allow_nonfinite(model):
            model.save_pretrained("diverged_adapter")

    (``merge_and_unload`` / ``merge_adapter`` also take ``allow_nonfinite=True``.) The flag lives on this model
    only: no other model is affected, and it is restored when the block ends.
    """
    owners = [model, *(m for m in model.modules() if isinstance(m, NeuronSelectModel))]
    previous = [owner.__dict__.get(_ALLOW_NONFINITE) for owner in owners]
    for owner in owners:
        owner.__dict__[_ALLOW_NONFINITE] = True
    try:
        yield model
    finally:
        for owner, value in zip(owners, previous):
            if value is None:
                owner.__dict__.pop(_ALLOW_NONFINITE, None)
            else:
                owner.__dict__[_ALLOW_NONFINITE] = value


_allowing_nonfinite = allow_nonfinite  # methods below take an `allow_nonfinite` keyword that shadows the name


def _nonfinite_allowed(model: nn.Module) -> bool:
    return bool(model.__dict__.get(_ALLOW_NONFINITE)) or any(
        m.__dict__.get(_ALLOW_NONFINITE) for m in model.modules() if isinstance(m, NeuronSelectModel)
    )


def _refuse_nonfinite(named_tensors, action: str) -> None:
    """Raise `NonFiniteDeltaError` naming every delta with NaN/Inf (meta or empty shards are skipped)."""
    bad = []
    for name, tensor in named_tensors:
        if tensor.device.type == "meta" or tensor.numel() == 0:
            continue
        finite = torch.isfinite(tensor.detach())
        if not bool(finite.all()):
            n_nan, n_inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
            bad.append(f"{name} ({n_nan} NaN, {n_inf} Inf of {tensor.numel()} values)")
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise NonFiniteDeltaError(
            f"NeuronSelect: refusing to {action}: non-finite delta in {'; '.join(bad[:3])}{more}. NaNs detected: the "
            "run probably diverged (lower the learning rate, clip gradients). To do it anyway, pass "
            "allow_nonfinite=True to merge_and_unload / merge_adapter, or wrap the call in "
            "`with neuron_peft.allow_nonfinite(model):`."
        )


class NeuronSelectModel(UnsupportedPeftMethods, BaseTuner):
    """Neuron-level selective fine-tuning: train chosen output rows of Linear layers as sparse deltas.

    Example::

        import neuron_peft
        from neuron_peft import NeuronSelectConfig
        from peft import get_peft_model
        model = get_peft_model(base_model, NeuronSelectConfig(target_modules="all-linear", neuron_ratio=0.1))
    """

    prefix: str = PREFIX
    tuner_layer_cls = NeuronSelectLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    # ------------------------------------------------------------------ routing
    @property
    def _route_state(self) -> RouteState:
        return self.__dict__.setdefault("_neuron_route_state", RouteState())

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args, neuron_groups=None, **kwargs):
        """PeftModel runs each forward/generate inside this context with the call's keywords (incl. ``neuron_groups``)."""
        state = self._route_state
        previous, state.call_groups = state.call_groups, neuron_groups
        try:
            yield
        finally:
            state.call_groups = previous

    def forward(self, *args, neuron_groups=None, **kwargs):
        """Runs the base model; ``neuron_groups`` (one group name per sample) routes the weight gradients."""
        if neuron_groups is not None:
            kwargs["neuron_groups"] = neuron_groups  # taken out again by the model's GroupsPreHook
        return self.model(*args, **kwargs)

    def generate(self, *args, neuron_groups=None, **kwargs):
        # groups only route gradients; generation is the same for every group
        return self.model.generate(*args, **kwargs)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._route_state.adapter_groups.pop(adapter_name, None)

    # ------------------------------------------------------------------ injection
    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        config = self.peft_config[adapter_name]
        self._check_explicit_names(model, config)
        self._injected_names: list[str] = []
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        self._check_all_explicit_targeted(model, config)
        state = self._route_state
        for module in model.modules():
            if isinstance(module, NeuronSelectLayer) and isinstance(module._route, RouteState):
                state = module._route  # adapters added later share the model's existing state
                break
        self.__dict__["_neuron_route_state"] = state
        state.adapter_groups[adapter_name] = config.groups
        for module in model.modules():
            if isinstance(module, NeuronSelectLayer):
                state.attach(module)
        hooks = [h for h in model._forward_pre_hooks.values() if isinstance(h, GroupsPreHook)]
        if not hooks:
            model.register_forward_pre_hook(GroupsPreHook(state), with_kwargs=True)
        for hook in hooks:
            hook.zero3_done, hook.layers = False, None  # a new adapter's parameters need registering with ZeRO-3
        declare_groups_argument(model)  # Trainer keeps a `neuron_groups` column; generate accepts the keyword

    @staticmethod
    def _check_explicit_names(model: nn.Module, config: NeuronSelectConfig) -> None:
        names = dict(model.named_modules())
        for key in sorted(config.explicit_modules()):
            if key not in names:
                close = [n for n in names if n.endswith("." + key.rsplit(".", 1)[-1])][:3]
                hint = f" (did you mean one of {close}?)" if close else ""
                raise AdapterMismatchError(f"unknown module {key!r}: not in the model's named_modules(){hint}")

    def _create_and_replace(
        self, config: NeuronSelectConfig, adapter_name, target, target_name, parent, current_key, **optional_kwargs
    ):
        if current_key is None:
            raise ValueError("Current key shouldn't be `None`")
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        rows, row_groups = self._resolve_rows(config, current_key, base)
        cols, col_groups = self._resolve_columns(config, current_key, base, rows)
        if rows.numel() == 0 and cols is None:
            raise AdapterMismatchError(
                f"module {current_key!r}: no rows or columns selected (agnostic and language lists are empty)"
            )
        kwargs = {
            "cols": cols,
            "col_groups": col_groups,
            "train_bias": config.train_bias,
            "init_weights": config.init_weights,
            "seed": config.seed + zlib.crc32(current_key.encode()),
            "update_path": getattr(config, "update_path", "auto"),
            **get_quantization_kwargs(self),
        }
        if isinstance(target, Linear):
            target.update_layer(adapter_name, rows, row_groups, **kwargs)
        else:
            new_module = self._create_new_module(
                config, adapter_name, target, rows=rows, row_groups=row_groups, **kwargs
            )
            if adapter_name not in self.active_adapters:
                new_module.requires_grad_(False)
            self._replace_module(parent, target_name, new_module, target)
        self._injected_names.append(current_key)

    @staticmethod
    def _create_new_module(config, adapter_name, target, rows, row_groups, **kwargs):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        new_module = Linear(target, adapter_name, rows, row_groups, **kwargs)
        if new_module.fan_in_fan_out != config.fan_in_fan_out:
            warnings.warn(
                f"fan_in_fan_out={config.fan_in_fan_out} but the target is {type(base).__name__}; "
                f"using fan_in_fan_out={new_module.fan_in_fan_out} for it.",
                stacklevel=2,
            )
        return new_module

    def _resolve_rows(self, config: NeuronSelectConfig, name: str, base: nn.Module):
        layer_out = _out_features(base, name)
        explicit = config.rows_for(name)
        if explicit is not None:  # validated again: the config's dicts may have been edited after construction
            agnostic, specific = explicit
            explicit = (
                _check_rows(f"neurons[{name!r}]", agnostic),
                [(g, _check_rows(f"language_neurons[{g!r}][{name!r}]", r)) for g, r in specific],
            )
        if explicit is None:
            k = max(1, int(round(config.neuron_ratio * layer_out)))
            weight = _weight_rows(base, name)
            agnostic = (
                list(range(layer_out))
                if k == layer_out
                else pick_rows(weight, k, config.neuron_init, config.seed, name)
            )
            # write the pick back so the saved config lists explicit rows and a reload never re-selects
            config.neurons = {**(config.neurons or {}), name: agnostic}
            specific = [(g, []) for g in config.groups]
        else:
            agnostic, specific = explicit
        rows, groups = _flatten_units(agnostic, specific)
        bad = [r for r in rows if r >= layer_out]
        if bad:
            raise AdapterMismatchError(
                f"module {name!r}: row index {bad[0]} out of range (the layer has {layer_out} output rows)"
            )
        return torch.tensor(rows, dtype=torch.long), torch.tensor(groups, dtype=torch.long)

    @staticmethod
    def _resolve_columns(config: NeuronSelectConfig, name: str, base: nn.Module, rows: torch.Tensor):
        """(columns, owner ids) of a module from the config (empty when it has none), checked against the layer."""
        agnostic, specific = config.columns_for(name)
        agnostic = _check_rows(f"columns[{name!r}]", agnostic, "column")
        specific = [(g, _check_rows(f"language_columns[{g!r}][{name!r}]", c, "column")) for g, c in specific]
        cols, groups = _flatten_units(agnostic, specific)
        if not cols:
            return None, None
        features = linear_features(base)
        layer_in = features[0] if features is not None else int(getattr(base, "in_features", 0))
        bad = [c for c in cols if c >= layer_in]
        if bad:
            raise AdapterMismatchError(
                f"module {name!r}: column index {bad[0]} out of range (the layer has {layer_in} input columns)"
            )
        if rows.numel() == _out_features(base, name):
            raise AdapterMismatchError(
                f"module {name!r}: every row is selected, so its columns would add no parameter (entries in a selected "
                "row belong to the row); drop the columns or some rows"
            )
        return torch.tensor(cols, dtype=torch.long), torch.tensor(groups, dtype=torch.long)

    def _check_all_explicit_targeted(self, model: nn.Module, config: NeuronSelectConfig) -> None:
        injected = set(self._injected_names)
        missing = sorted(config.explicit_modules() - injected)
        if missing:
            raise AdapterMismatchError(
                f"modules {missing[:5]} have rows or columns in `neurons`/`language_neurons`/`columns`/"
                "`language_columns` but are not targeted "
                "(check target_modules / exclude_modules / layers_to_transform)"
            )
        self._mark_shared_weights(model)
        add_tags = getattr(model, "add_model_tags", None)
        if callable(add_tags):
            add_tags(["neuron-select"])

    @staticmethod
    def _mark_shared_weights(model: nn.Module) -> None:
        """Tied weights (e.g. lm_head <-> embeddings) must not hold live rows: use the additive path there."""
        counts: dict[int, int] = {}
        for _, p in model.named_parameters(remove_duplicate=False):
            ptr = p.untyped_storage().data_ptr() if p.device.type != "meta" else id(p)
            counts[ptr] = counts.get(ptr, 0) + 1
        for module in model.modules():
            if isinstance(module, NeuronSelectLayer):
                w = getattr(module.get_base_layer(), "weight", None)
                if w is not None and w.device.type != "meta":
                    module.weight_is_shared = counts.get(w.untyped_storage().data_ptr(), 0) > 1

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        for adapter in self.active_adapters:
            if adapter in self.peft_config and not self.peft_config[adapter].train_bias:
                for m in model.modules():
                    if isinstance(m, NeuronSelectLayer) and adapter in m.neuron_select_bias_delta:
                        m.neuron_select_bias_delta[adapter].requires_grad_(False)

    # ------------------------------------------------------------------ live rows
    def restore_base_weights(self) -> None:
        """Kept for callers of earlier versions; does nothing: rows are swapped into a base weight only for the
        duration of a layer call, so the base weights always hold W0 outside one."""

    def _named_deltas(self, adapter_names):
        for name, module in self.model.named_modules():
            if isinstance(module, NeuronSelectLayer):
                for attr in module.adapter_layer_names:
                    for adapter in adapter_names:
                        if adapter in getattr(module, attr):
                            yield f"{name}.{attr}.{adapter}", getattr(module, attr)[adapter]

    def _check_mergeable(self, adapter_names) -> None:
        if not _nonfinite_allowed(self):
            names = list(adapter_names) if adapter_names is not None else list(self.active_adapters)
            _refuse_nonfinite(self._named_deltas(names), "merge")

    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Optional[list[str]] = None,
        allow_nonfinite: bool = False,
    ) -> nn.Module:
        """PEFT's ``merge_and_unload``; refuses NaN/Inf deltas (`NonFiniteDeltaError`) unless ``allow_nonfinite``."""
        block = _allowing_nonfinite(self) if allow_nonfinite else contextlib.nullcontext()
        with block:  # the check itself runs in _unload_and_optionally_merge, where every merging path ends
            return super().merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)

    def merge_adapter(
        self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False, allow_nonfinite: bool = False
    ) -> None:
        """PEFT's ``merge_adapter``; refuses NaN/Inf deltas (`NonFiniteDeltaError`) unless ``allow_nonfinite``."""
        if not allow_nonfinite:
            self._check_mergeable(adapter_names)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _unload_and_optionally_merge(self, *args, **kwargs):
        merge = kwargs.get("merge", args[0] if args else True)
        if merge:  # every merging path of PEFT ends here (merge_and_unload and subclasses' variants)
            self._check_mergeable(kwargs.get("adapter_names", args[3] if len(args) > 3 else None))
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        hooks = model._forward_pre_hooks
        for key in [k for k, h in hooks.items() if isinstance(h, GroupsPreHook)]:
            del hooks[key]
            model._forward_pre_hooks_with_kwargs.pop(key, None)
        undeclare_groups_argument(model)
        return model

    # ------------------------------------------------------------------ saving
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """PEFT's selection of this adapter's tensors for ``save_pretrained`` / ``get_peft_model_state_dict``; refuses
        NaN/Inf deltas (`NonFiniteDeltaError`) unless the model is inside `allow_nonfinite`. It is also the one save
        step with the model at hand, so it keeps the adapter's summary for the model card (`model_card.take_summary`)."""
        to_save = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        to_save = full_adapter_tensors(model, to_save)  # ZeRO-3: gathered, never (0,)-shaped placeholders
        take_summary(model, config, adapter_name)  # for the model card, written when the config is saved
        if not _nonfinite_allowed(model):
            deltas = (
                (key.removeprefix("base_model.model."), value)
                for key, value in to_save.items()
                if any(f".{attr}." in key for attr in NeuronSelectLayer.adapter_layer_names)
            )
            _refuse_nonfinite(deltas, f"save adapter {adapter_name!r}")
        return to_save

    # ------------------------------------------------------------------ loading
    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """PEFT's key remapping, then `check_adapter_state_dict`: a mismatch is an error, never a partial load."""
        state_dict = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        return check_adapter_state_dict(model, adapter_name, state_dict)

    # ------------------------------------------------------------------ reporting
    def selection_summary(self, adapter_name: Optional[str] = None) -> dict:
        """What one adapter trains (layers, rows per module type and group, parameters, settings); see
        `neuron_peft.tuner.summary.selection_summary`. Used by the model card and the CLI."""
        return selection_summary(self, adapter_name)
