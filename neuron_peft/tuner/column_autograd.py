"""Sparse backward for selected input columns (alone or beside selected rows).

A column unit c of a layer is the weight column ``W[:, c]``: how input channel c feeds every output. Its delta is
``(n, kc)`` for the kc selected columns over the n rows it covers: every output row, except the rows the same
adapter selects as rows (an entry in both a selected row and a selected column belongs to the row, so it is one
parameter, counted once). `full_columns` spreads it to ``(out, kc)`` with zeros at the row-owned entries.

The weight gradient of a column needs only the selected input channels: ``grad = g^T @ x[..., cols]``. So a
layer with columns only keeps ``x[..., cols]`` for backward, not the whole input (LoRA keeps the whole input for
its A gradient, rows keep it for theirs): for ``down_proj`` that is the MLP's widest activation.

Autograd Functions, all exact against a dense ``W0 + delta`` reference and free of any (out, in) weight gradient:

* `LiveUnitsLinear` — rows and columns swapped into the base weight for the one matmul (`UnitsWritten`), the same
  in backward for ``grad_x``; the base weight holds W0 whenever the Function is not running.
* `UnitsDeltaLinear` — the same math without writing the weight: what `torch.compile` traces.
* `AddColumnDelta` — adds ``x[..., cols] @ full^T`` to whatever the base layer returned (quantized, sharded or
  hooked bases, several adapters at once); rows take `AddRowDelta` beside it.

``row_mask`` (samples x k) and ``col_mask`` (samples x kc) route the weight gradients by language: a sample sends
no gradient to a unit it does not own. The forward is the same for every sample.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .autograd import _add_rows, _remember_dtypes, _rows_grad


def full_columns(col_delta: torch.Tensor, col_rows: Optional[torch.Tensor], out_features: int) -> torch.Tensor:
    """The column delta as ``(out_features, kc)``: zeros at the rows the adapter trains as rows (``col_rows`` lists
    the rows the column delta covers; None = all of them)."""
    if col_rows is None:
        return col_delta
    full = col_delta.new_zeros(out_features, col_delta.shape[1])
    return full.index_copy(0, col_rows, col_delta)


def _masked(t: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``t`` (samples, ..., k) times a (samples or 1, k) routing mask broadcast over the middle dimensions."""
    if mask is None:
        return t
    shape = [mask.shape[0]] + [1] * (t.dim() - 2) + [mask.shape[-1]]
    return t * mask.view(shape).to(t.dtype)


def _cols_grad(g: torch.Tensor, xc: torch.Tensor, col_mask, col_rows, dtype: torch.dtype) -> torch.Tensor:
    """grad of the column delta: ``g^T @ x[..., cols]`` over all tokens, routed, restricted to the rows it covers."""
    xc = _masked(xc, col_mask)
    g2 = g.reshape(-1, g.shape[-1])
    grad = g2.t().matmul(xc.reshape(-1, xc.shape[-1]).to(g2.dtype))
    if col_rows is not None:
        grad = grad.index_select(0, col_rows)
    return grad.to(dtype)


class UnitsWritten:
    """Within the block the base weight holds ``W0`` plus the row deltas (and bias deltas) and the column deltas; at
    exit, even on an exception, exactly W0 is back. Rows are written first, then columns (whose full delta is zero
    on row-owned entries); restoring goes the other way. Writes go through ``.data``, as in `RowsWritten`, so the
    frozen weight's autograd version never moves."""

    __slots__ = ("w", "b", "rows", "delta", "bias_delta", "cols", "full", "orig_w", "orig_b", "orig_c")

    def __init__(self, weight, bias, rows, delta, bias_delta, cols, full, fan_in_fan_out: bool):
        w = weight.data
        self.w = w.t() if fan_in_fan_out else w  # (out, in) view of the storage
        self.b = None if bias is None or bias_delta is None else bias.data
        self.rows = rows if rows is not None and rows.numel() else None
        self.delta, self.bias_delta, self.cols, self.full = delta, bias_delta, cols, full

    def __enter__(self):
        if self.rows is not None:
            self.orig_w = _add_rows(self.w, self.rows, self.delta.detach())
            if self.b is not None:
                self.orig_b = _add_rows(self.b, self.rows, self.bias_delta.detach())
        self.orig_c = _add_rows(self.w, self.cols, self.full.detach(), dim=1)
        return self

    def __exit__(self, *exc):
        self.w.index_copy_(1, self.cols, self.orig_c)
        if self.rows is not None:
            self.w.index_copy_(0, self.rows, self.orig_w)
            if self.b is not None:
                self.b.index_copy_(0, self.rows, self.orig_b)
        return False


def _remember(ctx, x, delta, bias_delta, col_delta, rows, fan_in_fan_out) -> None:
    _remember_dtypes(ctx, x, delta, bias_delta)
    ctx.col_dtype = col_delta.dtype
    ctx.has_rows = rows.numel() > 0
    ctx.in_features = x.shape[-1]
    ctx.fan_in_fan_out = fan_in_fan_out


def _unit_grads(ctx, grad_y, x, xc, rows, delta_needed: bool, cols_needed: bool, row_mask, col_mask, col_rows):
    grad_delta = grad_bias = grad_col = None
    if ctx.has_rows and delta_needed:
        grad_delta, grad_bias = _rows_grad(grad_y.index_select(-1, rows), x, row_mask, ctx.has_bias_delta,
                                           ctx.delta_dtype)  # fmt: skip
    elif delta_needed:  # a columns-only layer's (0, in) row delta: an empty gradient, as for any trainable tensor
        grad_delta = grad_y.new_zeros(0, ctx.in_features, dtype=ctx.delta_dtype)
    if cols_needed:
        grad_col = _cols_grad(grad_y, xc, col_mask, col_rows, ctx.col_dtype)
    return grad_delta, grad_bias, grad_col


class LiveUnitsLinear(torch.autograd.Function):
    """y = x @ (W0 + rows + columns)^T + (b0 + bias_delta), the units swapped into W0 for the matmul only.

    Backward: ``grad_x = g @ W_eff`` (units swapped in again), ``grad_delta = g[..., rows]^T @ x`` and
    ``grad_col = g^T @ x[..., cols]``. With no rows, only ``x[..., cols]`` is kept for backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, delta, bias_delta, rows, col_delta, cols, col_rows, fan_in_fan_out, row_mask,
                col_mask):  # fmt: skip
        w_out = weight.shape[1] if fan_in_fan_out else weight.shape[0]
        full = full_columns(col_delta.detach(), col_rows, w_out)
        with torch.no_grad(), UnitsWritten(weight, bias, rows, delta, bias_delta, cols, full, fan_in_fan_out):
            y = F.linear(x, weight.t() if fan_in_fan_out else weight, bias)
        _remember(ctx, x, delta, bias_delta, col_delta, rows, fan_in_fan_out)
        keep_x = x if ctx.has_rows else None
        xc = None if ctx.has_rows else x.index_select(-1, cols)
        ctx.save_for_backward(keep_x, xc, weight, delta, rows, col_delta, cols, col_rows, row_mask, col_mask)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, xc, weight, delta, rows, col_delta, cols, col_rows, row_mask, col_mask = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            w_out = weight.shape[1] if ctx.fan_in_fan_out else weight.shape[0]
            full = full_columns(col_delta.detach(), col_rows, w_out)
            with UnitsWritten(weight, None, rows, delta, None, cols, full, ctx.fan_in_fan_out):
                w = weight.t() if ctx.fan_in_fan_out else weight
                grad_x = grad_y.matmul(w.to(grad_y.dtype)).to(ctx.x_dtype)
        if xc is None:
            xc = x.index_select(-1, cols)
        need = ctx.needs_input_grad
        grad_delta, grad_bias, grad_col = _unit_grads(
            ctx, grad_y, x, xc, rows, need[3] or need[4], need[6], row_mask, col_mask, col_rows
        )
        return grad_x, None, None, grad_delta, grad_bias, None, grad_col, None, None, None, None, None


class UnitsDeltaLinear(torch.autograd.Function):
    """y = x @ W0^T + b0, plus the rows' update in their outputs and ``x[..., cols] @ full^T`` in every output, out
    of place and without writing W0: the form `torch.compile` traces (same math as `LiveUnitsLinear`; rounding
    differs in the last bits because deltas are added to the output, not the weight)."""

    @staticmethod
    def forward(ctx, x, weight, bias, delta, bias_delta, rows, col_delta, cols, col_rows, fan_in_fan_out, row_mask,
                col_mask):  # fmt: skip
        y = F.linear(x, weight.t() if fan_in_fan_out else weight, bias)
        dt = y.dtype
        if rows.numel():
            update = F.linear(x.to(dt), delta.to(dt), None if bias_delta is None else bias_delta.to(dt))
            y = y.index_add(-1, rows, update)
        full = full_columns(col_delta, col_rows, y.shape[-1])
        y = y + F.linear(x.index_select(-1, cols).to(dt), full.to(dt))
        _remember(ctx, x, delta, bias_delta, col_delta, rows, fan_in_fan_out)
        ctx.save_for_backward(x, weight, delta, rows, col_delta, cols, col_rows, row_mask, col_mask)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, delta, rows, col_delta, cols, col_rows, row_mask, col_mask = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            w = weight.t() if ctx.fan_in_fan_out else weight
            grad_x = grad_y.matmul(w.to(grad_y.dtype))
            if ctx.has_rows:
                grad_x = grad_x + grad_y.index_select(-1, rows).matmul(delta.to(grad_y.dtype))
            full = full_columns(col_delta, col_rows, grad_y.shape[-1])
            grad_x = grad_x.index_add(-1, cols, grad_y.matmul(full.to(grad_y.dtype))).to(ctx.x_dtype)
        need = ctx.needs_input_grad
        grad_delta, grad_bias, grad_col = _unit_grads(
            ctx, grad_y, x, x.index_select(-1, cols), rows, need[3] or need[4], need[6], row_mask, col_mask, col_rows
        )
        return grad_x, None, None, grad_delta, grad_bias, None, grad_col, None, None, None, None, None


class AddColumnDelta(torch.autograd.Function):
    """out += x[..., cols] @ full^T (in place on the base layer's output when that is safe): any base layer."""

    @staticmethod
    def forward(ctx, out, x, col_delta, cols, col_rows, col_mask):
        dt = out.dtype
        xc = x.index_select(-1, cols)
        update = F.linear(xc.to(dt), full_columns(col_delta, col_rows, out.shape[-1]).to(dt))
        if out._base is not None:
            out = out.clone()  # a view (e.g. Conv1D's reshaped addmm): write into a fresh tensor
        else:
            ctx.mark_dirty(out)
        out.add_(update)
        ctx.col_dtype, ctx.x_dtype, ctx.in_features = col_delta.dtype, x.dtype, x.shape[-1]
        ctx.save_for_backward(xc, col_delta, cols, col_rows, col_mask)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xc, col_delta, cols, col_rows, col_mask = ctx.saved_tensors
        grad_x = grad_col = None
        if ctx.needs_input_grad[1]:
            full = full_columns(col_delta, col_rows, grad_out.shape[-1])
            grad_xc = grad_out.matmul(full.to(grad_out.dtype)).to(ctx.x_dtype)
            grad_x = grad_xc.new_zeros(*grad_xc.shape[:-1], ctx.in_features).index_add_(-1, cols, grad_xc)
        if ctx.needs_input_grad[2]:
            grad_col = _cols_grad(grad_out, xc, col_mask, col_rows, ctx.col_dtype)
        return grad_out, grad_x, grad_col, None, None, None
