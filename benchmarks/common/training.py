"""The training run every translation method goes through, the same for all of them.

Same batches in the same order for every method (a seeded shuffle of the same encoded pairs; per-sample language
groups only for routed methods), the same number of optimizer steps, the loss on answer tokens only
(`neuron_peft.training.answer_loss`) and AdamW with a cosine schedule (`neuron_peft.training.train_loop`). What a
method may differ in is its trainable parameters and its learning rate. `train_one` also times the run and
measures its peak memory (`machine.PeakMemory`).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from neuron_peft.data import TranslationCollator

from .machine import PeakMemory

if TYPE_CHECKING:
    from .preset import Preset


def train_batches(features, tok, p: Preset, routed: bool) -> torch.utils.data.DataLoader:
    """The training batches: the same ones, in the same order, for every method (seeded shuffle)."""
    collate = TranslationCollator(tok, return_groups=routed)
    gen = torch.Generator().manual_seed(p.seed)
    return torch.utils.data.DataLoader(features, batch_size=p.batch_size, shuffle=True, collate_fn=collate,
                                       generator=gen)  # fmt: skip


def train_one(model, routed: bool, tok, features, p: Preset, lr: float, device) -> dict:
    """Train `model` in place at `lr`: {seconds, losses, peak_mib, before_mib, memory_how}."""
    from neuron_peft.training import answer_loss, train_loop

    loader = train_batches(features, tok, p, routed)
    model.train()
    with PeakMemory(device) as mem:
        start = time.perf_counter()
        losses = train_loop(model, loader, steps=p.steps, lr=lr, progress=True, loss_fn=answer_loss)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    model.eval()
    return {"seconds": seconds, "losses": losses, "peak_mib": mem.peak_mib, "before_mib": mem.before_mib,
            "memory_how": mem.how}  # fmt: skip
