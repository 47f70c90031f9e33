"""Merging a NeuronSelect adapter into its base layer, and the dense view of its delta.

Merging writes only the selected rows (``W[rows] += delta``, ``b[rows] += bias_delta``) and columns
(``W[other rows, cols] += col_delta``) with one fp32 sum and one rounding per entry, the same rounding the live
forward uses, so a merged model computes what the unmerged one did. Quantized bases are dequantized, changed and
re-quantized (exact up to quantization rounding); sharded bases are refused.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from peft.tuners.tuners_utils import check_adapters_to_merge


class Merging:
    """Mixed into `NeuronSelectLayer`: ``merge`` / ``unmerge`` / ``get_delta_weight`` over rows and columns."""

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
        if adapter_name in self.neuron_select_col_delta:
            full = self._full_columns(adapter_name, self.neuron_select_col_delta[adapter_name].detach())
            dense.index_add_(1, self.neuron_select_col_indices[adapter_name], full.to(dense.dtype))
        return dense.t() if self.fan_in_fan_out else dense

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """PEFT >= 0.22's ``convert_to_lora`` turns an additive delta into LoRA factors by SVD. Ours is additive
        (W' = W + dense(rows, columns); routing changes only which samples train a unit, never the forward), but a
        LoRA adapter has no bias, so an adapter that trains bias entries cannot be converted without losing them."""
        if adapter_name not in self.neuron_select_delta:
            return False
        return (
            adapter_name not in self.neuron_select_bias_delta
            or self.neuron_select_bias_delta[adapter_name].numel() == 0
        )

    def _get_additive_delta(self, adapter_name: str = "default") -> torch.Tensor:
        """W' - W for PEFT's ``get_additive_delta`` (which refuses while adapters are merged): the dense delta, in the
        adapter's dtype."""
        return self.get_delta_weight(adapter_name)

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
            new_c = None
            if adapter_name in self.neuron_select_col_delta:
                cols = self.neuron_select_col_indices[adapter_name]
                full = self._full_columns(adapter_name, self.neuron_select_col_delta[adapter_name].detach())
                new_c = (cols, full.float() * sign)
            new_b = None
            if bias_delta is not None:
                bidx = slice(None) if rows is None else rows
                new_b = (base.bias.data[bidx].float() + sign * bias_delta.float().to(base.bias.device)).to(
                    base.bias.dtype
                )
            finite = torch.isfinite(new_w).all() and (new_b is None or torch.isfinite(new_b).all())
            if new_c is not None:
                w_cols = weight.t() if self.fan_in_fan_out else weight
                finite = finite and torch.isfinite(w_cols.index_select(1, new_c[0]).float() + new_c[1]).all()
            if safe:
                # like PEFT's safe_merge, the whole merged layer must be finite, not only the entries this adapter
                # writes: a base that already holds NaN/Inf is refused too, and nothing is written before the check
                finite = finite and torch.isfinite(weight).all()
                if bias_delta is not None:
                    finite = finite and torch.isfinite(base.bias.data).all()
            if safe and not finite:
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter_name} seems to be broken")
            self._write_rows(weight, rows, new_w)
            if new_c is not None:  # after the rows: the column delta is zero on row-owned entries
                w = weight.t() if self.fan_in_fan_out else weight
                cols, full = new_c
                cur_c = w.index_select(1, cols)
                w.index_copy_(1, cols, (cur_c.float() + full.to(cur_c.device)).to(cur_c.dtype))
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
