"""Sparse backward for selected rows: weight-gradient work only for the rows that train.

Autograd Functions, all exact (they match a dense autograd reference) and all free of any (out, in) weight
gradient:

* `LiveRowsLinear` — the selected rows are swapped into the base weight for the duration of the matmul only
  (`RowsWritten`), so the forward is the base layer's single matmul and the backward is ``grad_x = g @ W`` (rows
  swapped in again) plus ``grad_delta = g[..., rows]^T @ x``. Fastest; needs a plain, unshared, frozen base weight.
* `RowDeltaLinear` — the same math without writing the weight (``y[..., rows] += x @ delta^T``): what
  `torch.compile` traces.
* `AddRowDelta` — adds ``x @ delta^T + bias_delta`` into the selected output columns of whatever the base layer
  returned. Works on any base (quantized, sharded, hooked, several adapters at once) at the cost of an extra
  k/out-sized matmul in forward and backward.
* `DenseDeltaLinear` — every row selected: ``W0 + delta`` formed transiently, never kept.

``route_mask`` (samples x k, or None) zeroes the gradient a sample sends to rows it does not own: the forward is
unchanged, only the weight gradient is routed.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _rows_grad(g_rows, x, route_mask: Optional[torch.Tensor], want_bias: bool, dtype: torch.dtype):
    """grad_delta = g_rows^T @ x over all tokens (and the bias rows), with per-sample routing, in `dtype`."""
    if route_mask is not None:
        shape = [route_mask.shape[0]] + [1] * (g_rows.dim() - 2) + [route_mask.shape[-1]]
        g_rows = g_rows * route_mask.view(shape).to(g_rows.dtype)
    x2 = x.reshape(-1, x.shape[-1])
    g2 = g_rows.reshape(x2.shape[0], g_rows.shape[-1])  # token count from x: also right for k = 0 (columns only)
    x2 = x2.to(g2.dtype)
    grad_delta = g2.t().matmul(x2).to(dtype)
    grad_bias = g2.sum(0).to(dtype) if want_bias else None
    return grad_delta, grad_bias


def _remember_dtypes(ctx, x, delta, bias_delta) -> None:
    """What every backward needs to hand gradients back in their inputs' dtypes (fp32 deltas on a bf16 base)."""
    ctx.has_bias_delta = bias_delta is not None
    ctx.delta_dtype = delta.dtype
    ctx.x_dtype = x.dtype


class RowsWritten:
    """Within the block the base weight holds ``W0[rows] + delta`` (and the bias ``b0[rows] + bias_delta``); at exit,
    even on an exception, the exact original rows are back.

    Why: the effective weight of a selected-rows adapter differs from W0 in k rows only, so the cheapest exact
    forward is the base layer's one matmul on W0 with those k rows swapped in, a (k, in_features) copy beside an
    (tokens, in) x (in, out) matmul. Swapping in and out inside one layer call (rather than keeping the rows
    written between calls) means nothing outside the call ever sees ``W0 + delta`` in the base weight: not
    ``parameters()``, ``state_dict()``, ``deepcopy``, weight averaging, offload hooks, a ``disable_adapter()``
    reference pass, nor a ``p.data`` write to the delta that the next call would otherwise miss.

    Writes go through ``.data`` so the weight's autograd version counter does not move: the weight is frozen, and
    after the block it holds exactly the values autograd saw (F.linear and our backward may have saved it).
    """

    __slots__ = ("w", "b", "rows", "delta", "bias_delta", "orig_w", "orig_b")

    def __init__(self, weight, bias, rows, delta, bias_delta, fan_in_fan_out: bool):
        w = weight.data
        self.w = w.t() if fan_in_fan_out else w  # (out, in) view of the storage
        self.b = None if bias is None or bias_delta is None else bias.data
        self.rows, self.delta, self.bias_delta = rows, delta, bias_delta

    def __enter__(self):
        rows = self.rows
        self.orig_w = _add_rows(self.w, rows, self.delta.detach())
        if self.b is not None:
            self.orig_b = _add_rows(self.b, rows, self.bias_delta.detach())
        return self

    def __exit__(self, *exc):
        self.w.index_copy_(0, self.rows, self.orig_w)
        if self.b is not None:
            self.b.index_copy_(0, self.rows, self.orig_b)
        return False


def _add_rows(t: torch.Tensor, rows: torch.Tensor, delta: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``t[rows] += delta`` (``dim=1``: ``t[:, rows] += delta``, for columns) rounded as merging rounds it (sum in
    fp32, one rounding to t's dtype); returns the original entries. Same dtypes: one in-place ``index_add_`` (no
    temporary beyond the saved originals)."""
    orig = t.index_select(dim, rows)
    if delta.dtype == t.dtype:
        t.index_add_(dim, rows, delta)
    else:
        t.index_copy_(dim, rows, (orig.float() + delta.float()).to(t.dtype))
    return orig


class LiveRowsLinear(torch.autograd.Function):
    """y = x @ (W0 + delta)^T + (b0 + bias_delta), with the k selected rows swapped into W0 for the matmul only.

    Forward is the base layer's single matmul; backward is ``grad_x = g @ (W0 + delta)`` (rows swapped in again for
    that matmul) plus ``grad_delta = g[..., rows]^T @ x``. No gradient is produced for W or b, no (out, in) tensor
    is allocated, and the base weight holds W0 whenever this Function is not running (see `RowsWritten`).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, delta, bias_delta, rows, fan_in_fan_out, route_mask):
        with torch.no_grad(), RowsWritten(weight, bias, rows, delta, bias_delta, fan_in_fan_out):
            y = F.linear(x, weight.t() if fan_in_fan_out else weight, bias)
        ctx.fan_in_fan_out = fan_in_fan_out
        _remember_dtypes(ctx, x, delta, bias_delta)
        ctx.save_for_backward(x, weight, delta, rows, route_mask)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, delta, rows, route_mask = ctx.saved_tensors
        grad_x = grad_delta = grad_bias = None
        if ctx.needs_input_grad[0]:
            with RowsWritten(weight, None, rows, delta, None, ctx.fan_in_fan_out):
                w = weight.t() if ctx.fan_in_fan_out else weight
                grad_x = grad_y.matmul(w.to(grad_y.dtype)).to(ctx.x_dtype)
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            grad_delta, grad_bias = _rows_grad(grad_y.index_select(-1, rows), x, route_mask, ctx.has_bias_delta,
                                               ctx.delta_dtype)  # fmt: skip
        return grad_x, None, None, grad_delta, grad_bias, None, None, None


class RowDeltaLinear(torch.autograd.Function):
    """y = x @ W0^T + b0, then ``y[..., rows] += x @ delta^T + bias_delta``, out of place and without writing W0.

    The form `torch.compile` traces: no in-place write to a parameter, no Python-side state, so a compiled step
    compiles once. Same math as `LiveRowsLinear` (rounding differs in the last bits: the delta is added to the
    output instead of to the weight); costs one extra k/out-sized matmul in forward and backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, delta, bias_delta, rows, fan_in_fan_out, route_mask):
        y = F.linear(x, weight.t() if fan_in_fan_out else weight, bias)
        dt = y.dtype
        update = F.linear(x.to(dt), delta.to(dt), None if bias_delta is None else bias_delta.to(dt))
        ctx.fan_in_fan_out = fan_in_fan_out
        _remember_dtypes(ctx, x, delta, bias_delta)
        ctx.save_for_backward(x, weight, delta, rows, route_mask)
        return y.index_add(-1, rows, update)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, delta, rows, route_mask = ctx.saved_tensors
        g_rows = grad_y.index_select(-1, rows)
        grad_x = grad_delta = grad_bias = None
        if ctx.needs_input_grad[0]:
            w = weight.t() if ctx.fan_in_fan_out else weight
            grad_x = (grad_y.matmul(w.to(grad_y.dtype)) + g_rows.matmul(delta.to(g_rows.dtype))).to(ctx.x_dtype)
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            grad_delta, grad_bias = _rows_grad(g_rows, x, route_mask, ctx.has_bias_delta, ctx.delta_dtype)
        return grad_x, None, None, grad_delta, grad_bias, None, None, None


class AddRowDelta(torch.autograd.Function):
    """out[..., rows] += x @ delta^T + bias_delta (in place on the base layer's output when that is safe)."""

    @staticmethod
    def forward(ctx, out, x, delta, bias_delta, rows, route_mask):
        dt = out.dtype
        update = F.linear(x.to(dt), delta.to(dt), None if bias_delta is None else bias_delta.to(dt))
        if out._base is not None:
            # a view (e.g. Conv1D's reshaped addmm): write into a fresh tensor instead of the view
            out = out.clone()
        else:
            ctx.mark_dirty(out)
        if rows is None:
            out.add_(update)
        else:
            out.index_add_(-1, rows, update)
        _remember_dtypes(ctx, x, delta, bias_delta)
        ctx.save_for_backward(x, delta, rows, route_mask)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, delta, rows, route_mask = ctx.saved_tensors
        g_rows = grad_out if rows is None else grad_out.index_select(-1, rows)
        grad_x = grad_delta = grad_bias = None
        if ctx.needs_input_grad[1]:
            grad_x = g_rows.matmul(delta.to(g_rows.dtype)).to(ctx.x_dtype)
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            grad_delta, grad_bias = _rows_grad(g_rows, x, route_mask, ctx.has_bias_delta, ctx.delta_dtype)
        return grad_out, grad_x, grad_delta, grad_bias, None, None


class DenseDeltaLinear(torch.autograd.Function):
    """Every row selected, training: y = x @ (W0 + delta)^T + (b0 + bias_delta), W0 never written or copied to keep.

    The effective weight is formed transiently in forward and again in backward (one layer at a time), so a dense
    adapter holds no second copy of the base weight (the live path's saved original rows would be one); the cost
    is two elementwise passes over the weight per step. Only ``grad_x`` and ``grad_delta = g^T @ x`` are computed.
    """

    @staticmethod
    def _effective(weight, delta, fan_in_fan_out):
        w = weight.t() if fan_in_fan_out else weight
        return (w.float() + delta.float()).to(weight.dtype) if weight.dtype != delta.dtype else w + delta

    @staticmethod
    def forward(ctx, x, weight, bias, delta, bias_delta, fan_in_fan_out, route_mask):
        w = DenseDeltaLinear._effective(weight, delta.detach(), fan_in_fan_out)
        b = bias
        if bias_delta is not None:
            b = (bias.float() + bias_delta.detach().float()).to(bias.dtype)
        y = F.linear(x, w, b)
        ctx.fan_in_fan_out = fan_in_fan_out
        _remember_dtypes(ctx, x, delta, bias_delta)
        ctx.save_for_backward(x, weight, delta, route_mask)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, delta, route_mask = ctx.saved_tensors
        grad_x = grad_delta = grad_bias = None
        if ctx.needs_input_grad[0]:
            w = DenseDeltaLinear._effective(weight, delta.detach(), ctx.fan_in_fan_out)
            grad_x = grad_y.matmul(w.to(grad_y.dtype)).to(ctx.x_dtype)
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            grad_delta, grad_bias = _rows_grad(grad_y, x, route_mask, ctx.has_bias_delta, ctx.delta_dtype)
        return grad_x, None, None, grad_delta, grad_bias, None, None
