"""Sparse backward for selected rows: weight-gradient work only for the rows that train.

Two autograd Functions, both exact (they match a dense autograd reference) and both free of any (out, in)
gradient or per-forward dense weight copy:

* `LiveRowsLinear` — the selected rows are kept written into the base weight ("live"), so the forward is the
  base layer's single matmul and the backward is ``grad_x = g @ W`` plus ``grad_delta = g[..., rows]^T @ x``.
  Fastest (one matmul forward, no index work in forward); needs a plain, unshared, writable base weight.
* `AddRowDelta` — adds ``x @ delta^T + bias_delta`` into the selected output columns of whatever the base layer
  returned. Works on any base (quantized, sharded, hooked, several adapters at once) at the cost of an extra
  k/n-sized matmul in forward and backward.

With ``rows=None`` (every row selected) both use dense ops and no index gathers.
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
    g2 = g_rows.reshape(-1, g_rows.shape[-1])
    x2 = x.reshape(-1, x.shape[-1]).to(g2.dtype)
    grad_delta = g2.t().matmul(x2).to(dtype)
    grad_bias = g2.sum(0).to(dtype) if want_bias else None
    return grad_delta, grad_bias


def _remember_dtypes(ctx, x, delta, bias_delta) -> None:
    """What every backward needs to hand gradients back in their inputs' dtypes (fp32 deltas on a bf16 base)."""
    ctx.has_bias_delta = bias_delta is not None
    ctx.delta_dtype = delta.dtype
    ctx.x_dtype = x.dtype


class LiveRowsLinear(torch.autograd.Function):
    """y = x @ W^T + b where W and b already hold the live rows (W0[rows] + delta).

    `delta` / `bias_delta` are inputs only so that autograd hands them their gradients; the forward does not read
    them (their values are already inside W). No gradient is produced for W or b.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, delta, bias_delta, rows, fan_in_fan_out, route_mask):
        w = weight.t() if fan_in_fan_out else weight
        y = F.linear(x, w, bias)
        ctx.fan_in_fan_out = fan_in_fan_out
        _remember_dtypes(ctx, x, delta, bias_delta)
        ctx.save_for_backward(x, weight, rows, route_mask)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, rows, route_mask = ctx.saved_tensors
        grad_x = grad_delta = grad_bias = None
        if ctx.needs_input_grad[0]:
            w = weight.t() if ctx.fan_in_fan_out else weight
            grad_x = grad_y.matmul(w.to(grad_y.dtype)).to(ctx.x_dtype)
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            g_rows = grad_y if rows is None else grad_y.index_select(-1, rows)
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
