"""NeuronSelect tuner layer: trainable deltas for selected output rows and input columns of a Linear (or GPT-2
Conv1D).

Per adapter the layer holds
  * ``neuron_select_delta``      (k, in_features) trainable rows (k may be 0 when the layer trains columns only;
    that empty tensor is kept frozen, see ``frozen_peft_weight_names``),
  * ``neuron_select_bias_delta`` (k,) trainable bias entries (base has a bias, ``train_bias`` and k > 0),
  * ``neuron_select_indices``    (k,) int64 persistent buffer: which output rows these are,
  * ``neuron_select_row_groups`` (k,) int64 non-persistent: -1 = agnostic, g = owned by config.groups[g],
and, when it trains input columns,
  * ``neuron_select_col_delta``   (n, kc) trainable columns over the n = out_features - k rows that are not
    selected as rows (an entry in a selected row and a selected column belongs to the row: one parameter),
  * ``neuron_select_col_indices`` (kc,) int64 persistent buffer: which input columns these are,
  * ``neuron_select_col_groups``  (kc,) int64 non-persistent: owners, as for rows,
  * ``neuron_select_col_rows``    (n,) int64 non-persistent: the rows the column delta covers (only when k > 0).
The adapted layer computes the base layer with ``W[rows] += delta``, ``b[rows] += bias_delta`` and
``W[other rows, cols] += col_delta``.

Forward paths (see `autograd.py`):
  * live (default when safe): inside the layer's own forward (and again around ``grad_x`` in backward) the rows
    ``W0[rows] + delta`` are swapped into the base weight for the one matmul and W0 is put back at once, so the
    forward always uses the deltas as they are now (whoever wrote them: an optimizer, ``p.data``, a load) and
    nothing outside the call ever sees ``W0 + delta`` in the base weight. No module-level state is involved.
  * every row selected: ``W0 + delta`` is formed transiently (`DenseDeltaLinear`).
  * under `torch.compile`: the same math without writing the weight (`RowDeltaLinear`).
  * additive: ``out[..., rows] += x @ delta^T`` on the base output — quantized, sharded, hooked or tied base
    weights, several active adapters, or ``update_path="additive"``. Deltas that accelerate offloaded (cpu/disk
    offload, ``device_map`` with offloaded layers) are loaded through accelerate's hook for the call.
"""

from __future__ import annotations

from typing import Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import resolve_quantization_backend
from torch import nn
from transformers.pytorch_utils import Conv1D

from .autograd import AddRowDelta, DenseDeltaLinear, LiveRowsLinear, RowDeltaLinear
from .column_autograd import AddColumnDelta, LiveUnitsLinear, UnitsDeltaLinear, full_columns
from .config import _check_rows
from .merging import Merging
from .offload import OffloadedDeltas


def linear_features(module: nn.Module) -> Optional[tuple[int, int]]:
    """``(in_features, out_features)`` of a Linear-like layer (``nn.Linear`` and its subclasses, transformers' GPT-2
    ``Conv1D`` whose weight is stored as (in, out)), else None. The one place these sizes are read: the layer, the
    tuner's row checks and the selection pass all ask here. Under ZeRO-3 a weight is a partitioned shard, so a
    Conv1D's full shape comes from ``ds_shape``; ``nn.Linear`` keeps its sizes as attributes."""
    if isinstance(module, Conv1D):
        n_in, n_out = getattr(module.weight, "ds_shape", module.weight.shape)
        return int(n_in), int(n_out)
    if isinstance(module, nn.Linear):
        return int(module.in_features), int(module.out_features)
    return None


def mark_adapter_updated() -> None:
    """Kept for compatibility; does nothing.

    Earlier versions kept selected rows written into the base weight between calls and had to be told when a delta
    was changed through ``.data``. Rows are now swapped in per call, so every forward uses the current deltas.
    """


class NeuronSelectLayer(Merging, OffloadedDeltas, BaseTunerLayer):
    adapter_layer_names = ("neuron_select_delta", "neuron_select_bias_delta", "neuron_select_col_delta")
    other_param_names = (
        "neuron_select_indices",
        "neuron_select_row_groups",
        "neuron_select_col_indices",
        "neuron_select_col_groups",
        "neuron_select_col_rows",
    )

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.neuron_select_delta = nn.ParameterDict({})
        self.neuron_select_bias_delta = nn.ParameterDict({})
        self.neuron_select_indices = BufferDict({}, persistent=True)
        self.neuron_select_row_groups = BufferDict({}, persistent=False)
        self.neuron_select_col_delta = nn.ParameterDict({})
        self.neuron_select_col_indices = BufferDict({}, persistent=True)
        self.neuron_select_col_groups = BufferDict({}, persistent=False)
        self.neuron_select_col_rows = BufferDict({}, persistent=False)
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs
        # plain references for the per-call hot path (nn.Module attribute lookups cost microseconds each)
        self._fast = {
            "deltas": self.neuron_select_delta._parameters,
            "bias_deltas": self.neuron_select_bias_delta._parameters,
            "indices": self.neuron_select_indices._buffers,
            "col_deltas": self.neuron_select_col_delta._parameters,
            "col_indices": self.neuron_select_col_indices._buffers,
            "col_rows": self.neuron_select_col_rows._buffers,
        }
        self.quantization_backend = resolve_quantization_backend(
            self.get_base_layer(), get_apply_tensor_subclass=kwargs.get("get_apply_tensor_subclass")
        )
        base = self.get_base_layer()
        self._fast["base"] = base
        features = linear_features(base)
        if features is None and self.quantization_backend is not None:
            features = (int(base.in_features), int(base.out_features))
        if features is None:
            raise TypeError(
                f"NeuronSelect supports torch.nn.Linear, transformers Conv1D and quantized Linear layers, "
                f"got {type(base).__name__}"
            )
        self.in_features, self.out_features = features
        self.fan_in_fan_out = isinstance(base, Conv1D)
        self.update_path = "auto"
        self.weight_is_shared = False
        self._route = None  # set by the tuner: per-forward routing state shared by all layers of a model

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
        cols=None,
        col_groups=None,
        **kwargs,
    ) -> None:
        rows = _as_index_tensor(f"update_layer({adapter_name!r})", rows, "row")
        cols = _as_index_tensor(f"update_layer({adapter_name!r}) columns", [] if cols is None else cols, "column")
        k, kc = rows.numel(), cols.numel()
        if k == 0 and kc == 0:
            raise ValueError("NeuronSelect: a layer needs at least one selected row or column")
        if kc and int(cols.max()) >= self.in_features:
            bad = cols[cols >= self.in_features].tolist()[:10]
            raise IndexError(f"column indices {bad} out of range for a layer with {self.in_features} input columns")
        if kc and k == self.out_features:
            raise ValueError(
                "NeuronSelect: every row of this layer is selected, so its selected columns would add no parameter "
                "(entries in a selected row belong to the row); drop the columns or some rows"
            )
        if k and int(rows.max()) >= self.out_features:
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
        gen = torch.Generator().manual_seed(seed)
        delta = torch.zeros(k, self.in_features, dtype=torch.float32)
        if not init_weights:
            delta = torch.randn(k, self.in_features, generator=gen) * 0.02
        self.neuron_select_delta[adapter_name] = nn.Parameter(delta.to(dtype))
        has_bias = getattr(base, "bias", None) is not None
        if has_bias and train_bias and k:
            bias = torch.zeros(k) if init_weights else torch.randn(k, generator=gen) * 0.02
            self.neuron_select_bias_delta[adapter_name] = nn.Parameter(bias.to(dtype))
        self.neuron_select_indices[adapter_name] = rows.clone()
        row_groups = torch.as_tensor(row_groups, dtype=torch.long).clone()
        if row_groups.shape != rows.shape:
            raise ValueError("row_groups must give one group id per selected row")
        self.neuron_select_row_groups[adapter_name] = row_groups
        self.__dict__.setdefault("_specific", {})[adapter_name] = bool((row_groups >= 0).any())
        self._update_columns(adapter_name, rows, cols, col_groups, init_weights, gen, dtype)
        # A columns-only layer's (0, in) row delta has nothing to train: PEFT keeps it frozen through set_adapter,
        # set_requires_grad and _mark_only_adapters_as_trainable (its mechanism for adapter weights a method never
        # trains), so every trainable tensor is one an optimizer can move.
        frozen = {a: names for a, names in self.frozen_peft_weight_names.items() if a != adapter_name}
        if k == 0:
            frozen[adapter_name] = ("neuron_select_delta",)
        self.frozen_peft_weight_names = frozen  # per layer (the class attribute is PEFT's shared empty default)

        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _update_columns(self, adapter_name, rows, cols, col_groups, init_weights, gen, dtype) -> None:
        for store in (self.neuron_select_col_delta, self.neuron_select_col_indices, self.neuron_select_col_groups,
                      self.neuron_select_col_rows):  # fmt: skip
            if adapter_name in store:
                del store[adapter_name]
        kc = cols.numel()
        self.__dict__.setdefault("_specific_cols", {})[adapter_name] = False
        if kc == 0:
            return
        col_groups = torch.full((kc,), -1, dtype=torch.long) if col_groups is None else col_groups
        col_groups = torch.as_tensor(col_groups, dtype=torch.long).clone()
        if col_groups.shape != cols.shape:
            raise ValueError("col_groups must give one group id per selected column")
        covered = self.out_features
        if rows.numel():  # the column delta skips the rows the adapter trains as rows
            keep = torch.ones(self.out_features, dtype=torch.bool)
            keep[rows] = False
            self.neuron_select_col_rows[adapter_name] = keep.nonzero().flatten()
            covered -= rows.numel()
        delta = torch.zeros(covered, kc, dtype=torch.float32)
        if not init_weights:
            delta = torch.randn(covered, kc, generator=gen) * 0.02
        self.neuron_select_col_delta[adapter_name] = nn.Parameter(delta.to(dtype))
        self.neuron_select_col_indices[adapter_name] = cols.clone()
        self.neuron_select_col_groups[adapter_name] = col_groups
        self.__dict__["_specific_cols"][adapter_name] = bool((col_groups >= 0).any())

    def has_specific_rows(self, adapter_name: str) -> bool:
        """Whether this layer has language-specific rows for the adapter (only then is routing needed)."""
        return self.__dict__.get("_specific", {}).get(adapter_name, False)

    def has_specific_columns(self, adapter_name: str) -> bool:
        """Whether this layer has language-specific columns for the adapter."""
        return self.__dict__.get("_specific_cols", {}).get(adapter_name, False)

    def num_rows(self, adapter_name: str) -> int:
        return self.neuron_select_indices[adapter_name].numel()

    def num_columns(self, adapter_name: str) -> int:
        cols = self.neuron_select_col_indices
        return cols[adapter_name].numel() if adapter_name in cols else 0

    def _full_columns(self, adapter_name: str, col_delta: torch.Tensor) -> torch.Tensor:
        """The column delta as (out_features, kc), zeros at entries that belong to selected rows."""
        return full_columns(col_delta, self._fast["col_rows"].get(adapter_name), self.out_features)

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

    # ------------------------------------------------------------------ live rows
    def _live_allowed(self) -> bool:
        """Whether the rows may be swapped into the base weight for a call: a plain, frozen, unshared weight that no
        other system manages (quantized, sharded, offloaded or hooked weights take the additive path)."""
        if self.update_path == "additive" or self.quantization_backend is not None or self.weight_is_shared:
            return False
        base = self._fast["base"]
        if type(base) not in (nn.Linear, Conv1D):
            return False
        w = base._parameters.get("weight")
        if w is None or w.requires_grad or not w.is_floating_point() or type(w.data) is not torch.Tensor:
            return False  # DTensor (FSDP2 shards between calls) is not a plain tensor
        if w.device.type == "meta" or hasattr(w, "ds_id"):
            return False  # offloaded, or a DeepSpeed ZeRO-3 placeholder
        b = base._parameters.get("bias")
        if b is not None and (b.requires_grad or type(b.data) is not torch.Tensor):
            return False
        if base._forward_hooks or base._forward_pre_hooks or "_hf_hook" in base.__dict__:
            return False  # e.g. accelerate offloading: the base forward must run
        return True


def _as_index_tensor(where: str, indices, unit: str) -> torch.Tensor:
    """Row or column indices as an int64 tensor; floats, booleans and negatives are refused with the value given,
    never converted (``torch.as_tensor`` would truncate)."""
    if isinstance(indices, torch.Tensor) and not (indices.is_floating_point() or indices.dtype == torch.bool):
        indices = indices.flatten().tolist()
    return torch.tensor(_check_rows(where, indices, unit), dtype=torch.long)


class Linear(nn.Module, NeuronSelectLayer):
    """NeuronSelect on a Linear-like layer (nn.Linear, transformers Conv1D, quantized Linear via the additive path)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, rows, row_groups, **kwargs) -> None:
        super().__init__()
        NeuronSelectLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, rows, row_groups, **kwargs)

    def _route_mask(self, adapter_name: str, x: torch.Tensor, unit: str = "row") -> Optional[torch.Tensor]:
        route = self._route
        if route is None:
            return None
        return route.mask_for(self, adapter_name, x.shape[0], x.dim(), unit=unit)

    def _live_forward(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """One adapter on a plain base weight: rows swapped in for the call (sparse), a transient dense weight (all
        rows), or the non-writing form when `torch.compile` traces."""
        fast = self._fast
        base = fast["base"]
        weight, bias = base._parameters["weight"], base._parameters.get("bias")
        delta, bias_delta = fast["deltas"][name], fast["bias_deltas"].get(name)
        col_delta = fast["col_deltas"].get(name)
        if col_delta is not None:
            return self._live_units_forward(name, x, weight, bias, delta, bias_delta, col_delta)
        training = torch.is_grad_enabled() and (delta.requires_grad or x.requires_grad)
        mask = self._route_mask(name, x) if training else None
        rows = self._dense_rows(name)
        if rows is None:  # every row selected: no index work, no second copy of the weight
            return DenseDeltaLinear.apply(x, weight, bias, delta, bias_delta, self.fan_in_fan_out, mask)
        fn = RowDeltaLinear if torch.compiler.is_compiling() else LiveRowsLinear
        return fn.apply(x, weight, bias, delta, bias_delta, rows, self.fan_in_fan_out, mask)

    def _live_units_forward(self, name, x, weight, bias, delta, bias_delta, col_delta) -> torch.Tensor:
        """Rows and columns (or columns only) swapped in for the call, or the non-writing form under compile."""
        fast = self._fast
        training = torch.is_grad_enabled() and (delta.requires_grad or col_delta.requires_grad or x.requires_grad)
        row_mask = self._route_mask(name, x) if training else None
        col_mask = self._route_mask(name, x, unit="column") if training else None
        fn = UnitsDeltaLinear if torch.compiler.is_compiling() else LiveUnitsLinear
        return fn.apply(x, weight, bias, delta, bias_delta, fast["indices"][name], col_delta, fast["col_indices"][name],
                        fast["col_rows"].get(name), self.fan_in_fan_out, row_mask, col_mask)  # fmt: skip

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
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.neuron_select_delta]
        if not active:
            return self.base_layer(x, *args, **kwargs)

        if len(active) == 1 and not args and not kwargs and self._live_allowed():
            return self._live_forward(active[0], x)

        out = self.base_layer(x, *args, **kwargs)
        if self.quantization_backend is not None:
            out = self.quantization_backend.maybe_clone_base_result(out)  # bnb 4-bit: never write into its output
        for name in active:
            delta, bias_delta = self._adapter_tensors(name)
            out = AddRowDelta.apply(out, x, delta, bias_delta, self._dense_rows(name), self._route_mask(name, x))
            if name in self._fast["col_deltas"]:
                col_delta = self._adapter_col_tensor(name)
                out = AddColumnDelta.apply(out, x, col_delta, self._fast["col_indices"][name],
                                           self._fast["col_rows"].get(name), self._route_mask(name, x, "column"))  # fmt: skip
        return out

    def __repr__(self) -> str:
        return "neuron_select." + super().__repr__()

    def extra_repr(self) -> str:
        parts = []
        for a in self.neuron_select_indices:
            cols = f", {self.num_columns(a)}/{self.in_features} columns" if self.num_columns(a) else ""
            parts.append(f"{a}: {self.num_rows(a)}/{self.out_features} rows{cols}")
        return ", ".join(parts)
