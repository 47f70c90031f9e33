"""Turning a config's units into index tensors: picks without calibration data, and owner ids per unit.

Kept apart from the tuner so the rules that decide which rows and columns a layer trains read in one place.
"""

from __future__ import annotations

import zlib

import torch
from peft.utils import resolve_quantization_backend
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..distributed import gathered_parameters
from .layer import linear_features


def pick_rows(weight_rows: torch.Tensor, k: int, how: str, seed: int, module_name: str) -> list[int]:
    """Choose k rows without calibration data: largest L2 norm ("magnitude") or seeded uniform ("random")."""
    n = weight_rows.shape[0]
    if how == "magnitude":
        norms = weight_rows.detach().float().norm(dim=1)
        picked = torch.topk(norms.cpu(), k, sorted=False).indices
    else:
        gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(module_name.encode())) % (2**63))
        picked = torch.randperm(n, generator=gen)[:k]
    return sorted(int(i) for i in picked)


def _flatten_units(agnostic: list[int], specific: list[tuple[str, list[int]]]) -> tuple[list[int], list[int]]:
    """Agnostic then each group's indices, with owner ids (-1 = agnostic, g = the g-th group of config.groups)."""
    units, groups = list(agnostic), [-1] * len(agnostic)
    for gid, (_group, group_units) in enumerate(specific):
        units += group_units
        groups += [gid] * len(group_units)
    return units, groups


def _out_features(base: nn.Module, name: str) -> int:
    features = linear_features(base)
    if features is not None:
        return features[1]
    out = getattr(base, "out_features", None)  # quantized Linear-likes that do not subclass nn.Linear
    if out is None:
        raise TypeError(
            f"Target module {name!r} ({type(base).__name__}) is not supported: it is not a Linear layer, and "
            "NeuronSelect adapts only Linear layers (torch.nn.Linear, transformers Conv1D, quantized Linear-likes)"
        )
    return int(out)


def _weight_rows(base: nn.Module, name: str) -> torch.Tensor:
    """The weight as (out, in) rows, dequantized when needed (magnitude picks read it once)."""
    backend = resolve_quantization_backend(base)
    if backend is not None:
        return backend.get_base_weight(base).float()
    with gathered_parameters([base.weight]):  # ZeRO-3: read the full weight, keep a copy past the block
        weight = base.weight.detach().clone() if hasattr(base.weight, "ds_id") else base.weight
    return weight.t() if isinstance(base, Conv1D) else weight
