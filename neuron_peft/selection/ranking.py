"""Ranking helpers: the choices and ratios a selection is made with, and normalisation of scores within module
types (z-score or rank percentile), so layers of different projection types can be compared."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from .targets import PARTS

SCORE_NORMALIZATIONS = ("none", "module_type_z", "module_type_rank")
ROW_SELECTIONS = ("layers", "per_layer", "global")
GROUP_NORMALIZATIONS = ("mean", "none")


def _normalize_within(values: torch.Tensor, keys: list, how: str) -> torch.Tensor:
    """`values` (N,) normalised within each key's members: z-score or rank percentile (ties share their mean rank).

    z: (x - mean) / population std of the key's members (0 where the std is 0, e.g. a single member).
    rank: 0 for the lowest member, 1 for the highest, evenly spaced (a single member gets 0.5)."""
    if how == "none":
        return values.clone()
    values = values.to(torch.float64)
    out = torch.zeros_like(values)
    index: dict = {}
    for i, k in enumerate(keys):
        index.setdefault(k, []).append(i)
    for members in index.values():
        idx = torch.tensor(members)
        x = values[idx]
        if how == "module_type_z":
            std = x.std(unbiased=False)
            out[idx] = (x - x.mean()) / std if std > 0 else torch.zeros_like(x)
        elif how == "module_type_rank":
            n = x.numel()
            if n == 1:
                out[idx] = 0.5
                continue
            order = torch.argsort(x, stable=True)
            ranks = torch.empty(n, dtype=torch.float64)
            ranks[order] = torch.arange(n, dtype=torch.float64)
            # ties: every member of a run of equal values gets the run's mean rank
            uniq, inverse = torch.unique(x, return_inverse=True)
            if uniq.numel() < n:
                sums = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inverse, ranks)
                counts = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(
                    0, inverse, torch.ones(n, dtype=torch.float64)
                )
                ranks = (sums / counts)[inverse]
            out[idx] = ranks / (n - 1)
        else:
            raise ValueError(f"score_normalization must be one of {SCORE_NORMALIZATIONS}, got {how!r}")
    return out


def _check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _check_row_selection(row_selection, layer_scoring: str) -> str:
    """Only ``"layers"`` uses a layer score, and activation similarity is nothing but a layer score: any other row
    selection would silently drop it. Checked before scoring and again on every `NeuronSelection.decide`."""
    _check_choice("row_selection", row_selection, ROW_SELECTIONS)
    if layer_scoring == "activation_similarity" and row_selection != "layers":
        raise ValueError(f"layer_scoring='activation_similarity' ranks layers, but row_selection={row_selection!r} "
                         "has no layer step and would ignore it; use row_selection='layers'")  # fmt: skip
    return row_selection


def _check_ratio(name: str, value, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    low_ok = value >= 0.0 if allow_zero else value > 0.0
    if not (low_ok and value <= 1.0) or math.isnan(value):
        raise ValueError(f"{name} must be in {'[0' if allow_zero else '(0'}, 1], got {value!r}")
    return value


def _layer_ratios(layer_ratio, parts_present: list[str]) -> dict[str, float]:
    if isinstance(layer_ratio, Mapping):
        unknown = sorted(set(layer_ratio) - set(PARTS))
        if unknown:
            raise ValueError(f"layer_ratio: unknown part(s) {unknown}; parts are {list(PARTS)}")
        missing = [p for p in parts_present if p not in layer_ratio]
        if missing:
            raise ValueError(f"layer_ratio has no entry for part(s) {missing} present among the targeted layers")
        return {p: _check_ratio(f"layer_ratio[{p!r}]", layer_ratio[p]) for p in parts_present}
    value = _check_ratio("layer_ratio", layer_ratio)
    return dict.fromkeys(parts_present, value)


def _n_of(ratio: float, n: int) -> int:
    """round(ratio * n), at least 1 (a kept layer or a layer's rows are never empty)."""
    return min(n, max(1, int(round(ratio * n))))
