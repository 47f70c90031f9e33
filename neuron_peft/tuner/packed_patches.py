"""Packed-patch vision towers: which sample each row of a packed ``(patches, dim)`` tensor belongs to.

Qwen2-VL, Qwen2.5-VL, Qwen3-VL and GLM-4V run their vision tower on every image's patches packed into one tensor,
with no sample axis. Routing (`neuron_peft.tuner.routing.RouteState.set_packed`) uses `packed_patch_samples` to
give each packed row its sample, so language-specific rows of those towers are routed too.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import nn


def packs_patches(model: nn.Module) -> bool:
    """True when the vision tower runs on all images' patches packed into one (patches, dim) tensor (Qwen2-VL,
    Qwen2.5-VL, Qwen3-VL, GLM-4V: the forward takes ``image_grid_thw``). Their vision / projector layers have no
    sample axis; routing maps their rows to samples with `packed_patch_samples`."""
    forward = getattr(model, "forward", None)
    return forward is not None and "image_grid_thw" in inspect.signature(forward).parameters


def packed_patch_samples(config, input_ids: Optional[torch.Tensor], image_grid_thw: Optional[torch.Tensor] = None,
                         video_grid_thw: Optional[torch.Tensor] = None, n_samples: Optional[int] = None
                         ) -> dict[int, torch.Tensor]:  # fmt: skip
    """The sample of every row a packed-patch vision tower sees: ``{row count: (rows,) sample indices}``.

    Images (and videos) are packed in batch order; image ``j`` has ``t*h*w`` patch rows in the vision blocks and
    ``t*h*w / merge**2`` rows after the patch merger, which is also the number of image tokens it fills in
    ``input_ids``. Walking the samples' image-token counts assigns every image to its sample. Window attention
    (Qwen2.5-VL) reorders patches only inside an image, so the per-image ranges hold in every block. Returns ``{}``
    (and routing falls back to agnostic rows, with a warning) when the counts do not add up, e.g. with
    ``inputs_embeds`` instead of ``input_ids``.
    """
    if input_ids is None or config is None:
        return {}
    vision = getattr(config, "vision_config", None)
    merge = int(getattr(vision, "spatial_merge_size", 2) or 1)
    out: dict[int, torch.Tensor] = {}
    clashes: set[int] = set()
    for grid, token in ((image_grid_thw, "image_token_id"), (video_grid_thw, "video_token_id")):
        token_id = getattr(config, token, None)
        if grid is None or token_id is None:
            continue
        grid = torch.as_tensor(grid).reshape(-1, 3).long().cpu()
        patches = grid.prod(-1)
        merged = patches // (merge * merge)
        per_sample = (torch.as_tensor(input_ids).cpu() == token_id).sum(-1).reshape(-1).tolist()
        if n_samples is not None and len(per_sample) != n_samples:
            return {}
        owner, sample = [], 0
        for m in merged.tolist():
            while sample < len(per_sample) and per_sample[sample] == 0:
                sample += 1
            if sample == len(per_sample) or per_sample[sample] < m:
                return {}
            owner.append(sample)
            per_sample[sample] -= m
        if any(per_sample):
            return {}
        owner_t = torch.tensor(owner, dtype=torch.long)
        for counts in (patches, merged):
            ids = owner_t.repeat_interleave(counts)
            n = ids.numel()
            if n in out and not torch.equal(out[n], ids):
                clashes.add(n)  # two packings of the same length disagree: route neither
            out[n] = ids
    for n in clashes:
        out.pop(n, None)
    return out
