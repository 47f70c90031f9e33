"""NeuronSelect tuner layer: trainable deltas for selected output rows of a Linear (or GPT-2 Conv1D).

Per adapter the layer holds
  * ``neuron_select_delta``      (k, in_features) trainable rows,
  * ``neuron_select_bias_delta`` (k,) trainable bias entries (base has a bias and ``train_bias``),
  * ``neuron_select_indices``    (k,) int64 persistent buffer: which output rows these are,
  * ``neuron_select_row_groups`` (k,) int64 non-persistent: -1 = agnostic, g = owned by config.groups[g].
The adapted layer computes the base layer with ``W[rows] += delta`` and ``b[rows] += bias_delta``.

Forward paths (see `autograd.py`):
  * live (default when safe): rows are written into the base weight and a custom Function gives the sparse
    backward. The original rows are kept aside while live, so disable/unmerge/unload/state_dict restore the
    base weight exactly; any of those first calls `_restore_live()`.
  * additive: ``out[..., rows] += x @ delta^T`` on the base output — quantized, sharded, hooked or tied base
    weights, several active adapters, or ``update_path="additive"``.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from peft.utils import resolve_quantization_backend
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from transformers.pytorch_utils import Conv1D

from .autograd import AddRowDelta, DenseDeltaLinear, LiveRowsLinear

# Optimizers that write parameters outside autograd's version counter (fused AdamW, bitsandbytes, ...) still
# run torch's global step hooks; counting steps lets live rows resync after any optimizer step.
_OPTIMIZER_STEPS = [0]


def _count_step(optimizer, args, kwargs):
    _OPTIMIZER_STEPS[0] += 1


register_optimizer_step_post_hook(_count_step)


# layer -> weak reference to the Parameter that was its base weight when it was built. A different object later
# means someone else manages the weight (FSDP2 swaps in temporary all-gathered parameters for each forward), so no
# rows may be written into it. Deep copies and unpickled layers are absent and register their weight lazily.
_OWN_WEIGHTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def mark_adapter_updated() -> None:
    """Tell live layers their deltas changed (only needed after writing deltas through ``.data`` by hand)."""
    _OPTIMIZER_STEPS[0] += 1


class NeuronSelectLayer(BaseTunerLayer):
    adapter_layer_names = ("neuron_select_delta", "neuron_select_bias_delta")
    other_param_names = ("neuron_select_indices", "neuron_select_row_groups")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.neuron_select_delta = nn.ParameterDict({})
        self.neuron_select_bias_delta = nn.ParameterDict({})
        self.neuron_select_indices = BufferDict({}, persistent=True)
        self.neuron_select_row_groups = BufferDict({}, persistent=False)
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs
        # plain references for the per-call hot path (nn.Module attribute lookups cost microseconds each)
        self._fast = {
            "deltas": self.neuron_select_delta._parameters,
            "bias_deltas": self.neuron_select_bias_delta._parameters,
            "indices": self.neuron_select_indices._buffers,
        }
        self.quantization_backend = resolve_quantization_backend(
            self.get_base_layer(), get_apply_tensor_subclass=kwargs.get("get_apply_tensor_subclass")
        )
        base = self.get_base_layer()
        self._fast["base"] = base
        if isinstance(getattr(base, "weight", None), torch.Tensor):
            _OWN_WEIGHTS[self] = weakref.ref(base.weight)
        if isinstance(base, Conv1D):
            self.in_features, self.out_features = base.weight.shape
            self.fan_in_fan_out = True
        elif isinstance(base, nn.Linear) or self.quantization_backend is not None:
            self.in_features, self.out_features = base.in_features, base.out_features
            self.fan_in_fan_out = False
        else:
            raise TypeError(
                f"NeuronSelect supports torch.nn.Linear, transformers Conv1D and quantized Linear layers, "
                f"got {type(base).__name__}"
            )
        self.update_path = "auto"
        self.weight_is_shared = False
        self._route = None  # set by the tuner: per-forward routing state shared by all layers of a model
        # live state: which adapter's rows are written into the base weight, the original rows, a sync key
        self._live_adapter: Optional[str] = None
        self._live_orig: dict[str, torch.Tensor] = {}
        self._live_key = None

    # ------------------------------------------------------------------ adapter management
    def update_layer(
        self,
        adapter_name: str,
        rows: torch.Tensor,
        row_groups: torch.Tensor,
        train_bias: bool = True,
        init_weights: bool = True,
        seed: int = 0,
        update_path: str = "auto",
        inference_mode: bool = False,
        **kwargs,
    ) -> None:
        self._restore_live()
        rows = torch.as_tensor(rows, dtype=torch.long).flatten()
        k = rows.numel()
        if k == 0:
            raise ValueError("NeuronSelect: a layer needs at least one selected row")
        if int(rows.min()) < 0 or int(rows.max()) >= self.out_features:
            bad = rows[(rows < 0) | (rows >= self.out_features)].tolist()[:10]
            raise IndexError(f"row indices {bad} out of range for a layer with {self.out_features} output rows")
        if torch.unique(rows).numel() != k:
            raise ValueError("NeuronSelect: duplicate row indices in one layer")
        if update_path not in ("auto", "live", "additive"):
            raise ValueError(f"update_path must be 'auto', 'live' or 'additive', got {update_path!r}")
        self.update_path = update_path

        base = self.get_base_layer()
        weight = getattr(base, "weight", None)
        dtype = weight.dtype if weight is not None and weight.dtype.is_floating_point else torch.float32
        delta = torch.zeros(k, self.in_features, dtype=torch.float32)
        if not init_weights:
            gen = torch.Generator().manual_seed(seed)
            delta = torch.randn(k, self.in_features, generator=gen) * 0.02
        self.neuron_select_delta[adapter_name] = nn.Parameter(delta.to(dtype))
        has_bias = getattr(base, "bias", None) is not None
        if has_bias and train_bias:
            bias = torch.zeros(k) if init_weights else torch.randn(k, generator=gen) * 0.02
            self.neuron_select_bias_delta[adapter_name] = nn.Parameter(bias.to(dtype))
        self.neuron_select_indices[adapter_name] = rows.clone()
        row_groups = torch.as_tensor(row_groups, dtype=torch.long).clone()
        if row_groups.shape != rows.shape:
            raise ValueError("row_groups must give one group id per selected row")
        self.neuron_select_row_groups[adapter_name] = row_groups
        self.__dict__.setdefault("_specific", {})[adapter_name] = bool((row_groups >= 0).any())

        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
        self._restore_live()
        super().set_adapter(adapter_names, inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        self._restore_live()
        super().delete_adapter(adapter_name)

    def enable_adapters(self, enabled: bool) -> None:
        if not enabled:
            self._restore_live()
        super().enable_adapters(enabled)

    def has_specific_rows(self, adapter_name: str) -> bool:
        """Whether this layer has language-specific rows for the adapter (only then is routing needed)."""
        return self.__dict__.get("_specific", {}).get(adapter_name, False)

    def num_rows(self, adapter_name: str) -> int:
        return self.neuron_select_indices[adapter_name].numel()

    def _dense_rows(self, adapter_name: str) -> Optional[torch.Tensor]:
        """The row index tensor, or None when every row is selected in order (dense path, no gathers)."""
        rows = self._fast["indices"][adapter_name]
        if rows.numel() != self.out_features:
            return rows
        cache = self.__dict__.setdefault("_dense_cache", {})
        key = (id(rows), rows._version, rows.data_ptr())
        if cache.get(adapter_name, (None,))[0] != key:
            cache[adapter_name] = (key, torch.equal(rows.cpu(), torch.arange(self.out_features)))
        return None if cache[adapter_name][1] else rows

    # ------------------------------------------------------------------ weights
    def _read_rows(self, weight: torch.Tensor, rows: Optional[torch.Tensor]) -> torch.Tensor:
        """Selected rows of W as a (k, in) tensor (a copy)."""
        w = weight.t() if self.fan_in_fan_out else weight
        return w.clone() if rows is None else w.index_select(0, rows)

    def _write_rows(self, weight: torch.Tensor, rows: Optional[torch.Tensor], values: torch.Tensor) -> None:
        values = values.to(weight.dtype)
        if rows is None:
            weight.copy_(values.t() if self.fan_in_fan_out else values)
        elif self.fan_in_fan_out:
            weight.index_copy_(1, rows, values.t())
        else:
            weight.index_copy_(0, rows, values)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Dense delta in the base weight's layout (for inspection and PEFT utilities; merging uses rows)."""
        rows = self.neuron_select_indices[adapter_name]
        delta = self.neuron_select_delta[adapter_name]
        dense = torch.zeros(self.out_features, self.in_features, device=delta.device, dtype=delta.dtype)
        dense.index_copy_(0, rows, delta.detach())
        return dense.t() if self.fan_in_fan_out else dense

    def _apply_delta(self, adapter_name: str, sign: float, safe: bool = False) -> None:
        base = self.get_base_layer()
        rows = self._dense_rows(adapter_name)
        delta = self.neuron_select_delta[adapter_name].detach()
        bias_delta = (
            self.neuron_select_bias_delta[adapter_name].detach()
            if adapter_name in self.neuron_select_bias_delta
            else None
        )
        backend = self.quantization_backend
        if backend is not None and not backend.supports_merge:
            raise TypeError(
                f"NeuronSelect cannot merge into a {backend.backend_name or type(base).__name__} quantized base layer "
                "(the backend cannot dequantize and re-quantize); keep the adapter unmerged (the additive path serves "
                "it) or merge on an unquantized copy of the base model"
            )
        if backend is None and (hasattr(base.weight, "ds_id") or type(base.weight.data) is not torch.Tensor):
            raise NotImplementedError(
                f"NeuronSelect cannot merge into a sharded base weight ({type(base.weight.data).__name__}); save the "
                "adapter and merge it into an unsharded copy of the base model"
            )
        with torch.no_grad():
            if backend is not None:
                weight = self.get_base_weight().clone()  # dequantized
            else:
                weight = base.weight.data
            cur = self._read_rows(weight, rows)
            new_w = (cur.float() + sign * delta.float().to(cur.device)).to(cur.dtype)
            new_b = None
            if bias_delta is not None:
                bidx = slice(None) if rows is None else rows
                new_b = (base.bias.data[bidx].float() + sign * bias_delta.float().to(base.bias.device)).to(
                    base.bias.dtype
                )
            if safe and not (torch.isfinite(new_w).all() and (new_b is None or torch.isfinite(new_b).all())):
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter_name} seems to be broken")
            self._write_rows(weight, rows, new_w)
            if backend is not None:
                self.set_base_weight(weight)  # re-quantizes the whole weight
                warnings.warn(
                    "NeuronSelect: merging into (or unmerging from) a quantized base layer dequantizes the weight, "
                    "changes the selected rows and re-quantizes it, so the result is exact only up to quantization "
                    "rounding (rows sharing quantization blocks with the selected ones can move too)",
                    stacklevel=3,
                )
            if new_b is not None:
                if rows is None:
                    base.bias.data.copy_(new_b)
                else:
                    base.bias.data.index_copy_(0, rows, new_b)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        self._restore_live()
        for name in adapter_names:
            if name in self.neuron_select_delta:
                self._apply_delta(name, +1.0, safe=safe_merge)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.neuron_select_delta:
                self._apply_delta(name, -1.0)

    # ------------------------------------------------------------------ live rows
    def _live_allowed(self) -> bool:
        if self.update_path == "additive" or self.quantization_backend is not None or self.weight_is_shared:
            return False
        base = self._fast["base"]
        if type(base) not in (nn.Linear, Conv1D):
            return False
        w = base._parameters.get("weight")
        if w is None or w.requires_grad or not w.is_floating_point() or type(w.data) is not torch.Tensor:
            return False
        b = base._parameters.get("bias")
        if b is not None and (b.requires_grad or type(b.data) is not torch.Tensor):
            return False
        if base._forward_hooks or base._forward_pre_hooks or "_hf_hook" in base.__dict__:
            return False  # e.g. accelerate offloading: the base forward must run
        if self._weight_is_foreign():
            return False  # sharded or swapped in by FSDP2 / FSDP / ZeRO-3: never write rows into it
        return True

    def _weight_is_foreign(self) -> bool:
        """Whether another system manages the base weight: a sharded tensor (DTensor, DeepSpeed ZeRO-3 parameter) or
        not the Parameter this layer was built on (FSDP2 hands each forward a temporary all-gathered parameter that
        is freed or re-gathered from the shards afterwards, so rows written into it would be lost or go stale)."""
        w = getattr(self.get_base_layer(), "weight", None)
        if not isinstance(w, torch.Tensor) or hasattr(w, "ds_id") or type(w.data) is not torch.Tensor:
            return True
        ref = _OWN_WEIGHTS.get(self)
        if ref is None:  # a deep copy or an unpickled layer: its current weight is its own
            _OWN_WEIGHTS[self] = weakref.ref(w)
            return False
        return ref() is not w

    def _sync_live(self, adapter_name: str) -> None:
        """Write orig + delta into the base weight rows, unless nothing changed since the last write."""
        fast = self._fast
        base = fast["base"]
        delta = fast["deltas"][adapter_name]
        bias_delta = fast["bias_deltas"].get(adapter_name)
        weight = base._parameters["weight"]
        key = (
            adapter_name,
            _OPTIMIZER_STEPS[0],
            id(delta), delta._version, delta.data_ptr(),
            None if bias_delta is None else (id(bias_delta), bias_delta._version, bias_delta.data_ptr()),
            weight.data_ptr(), weight._version,
        )  # fmt: skip
        if self._live_key == key:
            return
        if self._live_adapter is not None and self._live_adapter != adapter_name:
            self._restore_live()
        rows = self._dense_rows(adapter_name)
        with torch.no_grad():
            weight = base.weight
            if self._live_adapter is None:
                self._live_orig["w"] = self._read_rows(weight, rows)
                if bias_delta is not None:
                    self._live_orig["b"] = (
                        base.bias.detach().clone() if rows is None else base.bias.index_select(0, rows)
                    )
                self._live_adapter = adapter_name
            orig = self._live_orig["w"].to(weight.device)
            self._write_rows(weight, rows, orig.float() + delta.detach().float())
            if bias_delta is not None:
                ob = self._live_orig["b"].to(base.bias.device)
                new_b = (ob.float() + bias_delta.detach().float()).to(base.bias.dtype)
                if rows is None:
                    base.bias.copy_(new_b)
                else:
                    base.bias.index_copy_(0, rows, new_b)
        self._live_key = key[:-1] + (base.weight._version,)

    def _restore_live(self) -> None:
        """Put the original rows back into the base weight (exact), leaving the layer un-live."""
        adapter_name = self.__dict__.get("_live_adapter")
        if adapter_name is None:
            return
        if self._weight_is_foreign():
            raise RuntimeError(
                "NeuronSelect: this layer's base weight holds live rows and was sharded or replaced since (FSDP2 "
                "fully_shard, FSDP, DeepSpeed ZeRO-3), so its original rows cannot be restored and the base weights "
                "are no longer exact. Call neuron_peft.distributed.prepare_for_sharding(model) (or "
                "restore_base_weights() on the PEFT model) after any forward and before sharding the model."
            )
        base = self.get_base_layer()
        rows = self._dense_rows(adapter_name)
        with torch.no_grad():
            self._write_rows(base.weight, rows, self._live_orig["w"].to(base.weight.device))
            if "b" in self._live_orig:
                ob = self._live_orig["b"].to(base.bias.device)
                if rows is None:
                    base.bias.copy_(ob)
                else:
                    base.bias.index_copy_(0, rows, ob)
        self._live_orig.clear()
        self._live_adapter = None
        self._live_key = None


def _restore_before_state_dict(module, prefix, keep_vars):
    module._restore_live()


def _restore_before_load(module, *args, **kwargs):
    module._restore_live()


class Linear(nn.Module, NeuronSelectLayer):
    """NeuronSelect on a Linear-like layer (nn.Linear, transformers Conv1D, quantized Linear via the additive path)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, rows, row_groups, **kwargs) -> None:
        super().__init__()
        NeuronSelectLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, rows, row_groups, **kwargs)
        # the base weight must never be seen with live rows from outside the layer
        self.register_state_dict_pre_hook(_restore_before_state_dict)
        self._register_load_state_dict_pre_hook(_restore_before_load, with_module=True)

    def _route_mask(self, adapter_name: str, x: torch.Tensor) -> Optional[torch.Tensor]:
        route = self._route
        if route is None:
            return None
        return route.mask_for(self, adapter_name, x.shape[0], x.dim())

    def _live_forward(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """One adapter on a plain base weight: live rows (sparse), a transient dense weight (all rows), or inference."""
        fast = self._fast
        base = fast["base"]
        weight, bias = base._parameters["weight"], base._parameters.get("bias")
        delta = fast["deltas"][name]
        training = torch.is_grad_enabled() and (delta.requires_grad or x.requires_grad)
        rows = self._dense_rows(name)
        if training and rows is None:
            # every row selected: no live copy of the original weight (it would double the layer's memory)
            self._restore_live()
            return DenseDeltaLinear.apply(
                x, weight, bias, delta, fast["bias_deltas"].get(name), self.fan_in_fan_out,
                self._route_mask(name, x),
            )  # fmt: skip
        self._sync_live(name)
        if not training:  # inference: exactly the base layer's matmul on the live weight
            return F.linear(x, weight.t() if self.fan_in_fan_out else weight, bias)
        return LiveRowsLinear.apply(
            x, weight, bias, delta, fast["bias_deltas"].get(name), rows, self.fan_in_fan_out,
            self._route_mask(name, x),
        )  # fmt: skip

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # hot path: one active adapter, live rows (plain dict lookups only; this runs for every layer and token)
        active = self._active_adapter
        if isinstance(active, (list, tuple)) and len(active) == 1:
            active = active[0]
        fast = self._fast
        if (
            isinstance(active, str)
            and not self._disable_adapters
            and not self.merged_adapters
            and active in fast["deltas"]
            and not args
            and not kwargs
            and self._live_allowed()
        ):
            return self._live_forward(active, x)
        return self._forward_general(x, *args, **kwargs)

    def _forward_general(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            self._restore_live()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.neuron_select_delta]
        if not active:
            self._restore_live()
            return self.base_layer(x, *args, **kwargs)

        if len(active) == 1 and not args and not kwargs and self._live_allowed():
            return self._live_forward(active[0], x)

        self._restore_live()
        out = self.base_layer(x, *args, **kwargs)
        if self.quantization_backend is not None:
            out = self.quantization_backend.maybe_clone_base_result(out)  # bnb 4-bit: never write into its output
        for name in active:
            delta = self.neuron_select_delta[name]
            bias_delta = self.neuron_select_bias_delta[name] if name in self.neuron_select_bias_delta else None
            out = AddRowDelta.apply(out, x, delta, bias_delta, self._dense_rows(name), self._route_mask(name, x))
        return out

    def __repr__(self) -> str:
        return "neuron_select." + super().__repr__()

    def extra_repr(self) -> str:
        parts = [f"{a}: {self.num_rows(a)}/{self.out_features} rows" for a in self.neuron_select_indices]
        return ", ".join(parts)
