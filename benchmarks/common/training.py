"""The training run every translation method goes through, the same for all of them.

Same batches in the same order for every method (a seeded shuffle of the same encoded pairs; per-sample language
groups only for routed methods), the same number of optimizer steps, the loss on answer tokens only
(`neuron_peft.training.labelled_logits_loss`: logits only where a label is not -100, the same loss and gradients as
the model's own; benchmarks/loss_positions.py times it) and AdamW with a cosine schedule and warm-up
(`neuron_peft.training.train_loop`). What a
method may differ in is its trainable parameters and its learning rate. `train_one` also times the run and
measures its peak memory (`machine.PeakMemory`). `pick_lr` is selection_value.py's learning-rate search: a start
grid, extended while the best value sits at its edge.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Callable

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


def train_one(model, routed: bool, tok, features, p: Preset, lr: float, device, on_step=None) -> dict:
    """Train `model` in place at `lr`: {seconds, losses, peak_mib, before_mib, memory_how}. ``on_step(step, loss)``
    is called after every optimizer step (selection_value.py's dev curve); its time is left out of ``seconds`` and
    reported as ``on_step_seconds``."""
    from neuron_peft.training import labelled_logits_loss, train_loop

    loader = train_batches(features, tok, p, routed)
    model.train()
    spent = [0.0]

    def timed_on_step(step: int, loss: float) -> None:
        t = time.perf_counter()
        on_step(step, loss)
        spent[0] += time.perf_counter() - t

    with PeakMemory(device) as mem:
        start = time.perf_counter()
        losses = train_loop(model, loader, steps=p.steps, lr=lr, progress=True, loss_fn=labelled_logits_loss,
                            warmup_ratio=p.warmup_ratio, on_step=timed_on_step if on_step else None)  # fmt: skip
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start - spent[0]
    model.eval()
    return {"seconds": seconds, "losses": losses, "peak_mib": mem.peak_mib, "before_mib": mem.before_mib,
            "memory_how": mem.how, "on_step_seconds": spent[0]}  # fmt: skip


def pick_lr(start: list[float], dev_of: Callable[[float], float], factor: float, max_extend: int):
    """(best lr, every lr tried, {lr: dev NLL}, still at an edge): lowest dev NLL over `start`; while the best is
    the lowest or highest value tried (and >= 3 were tried), try the next value beyond it (/ or x `factor`), at most
    `max_extend` times. Non-finite dev NLL (a diverged run) never wins; ties go to the smaller lr."""
    grid = sorted(set(start))
    devs = {lr: dev_of(lr) for lr in grid}
    for _ in range(max_extend + 1):
        best = min(grid, key=lambda x: (devs[x] if math.isfinite(devs[x]) else math.inf, x))
        if len(grid) < 3 or best not in (grid[0], grid[-1]) or _ == max_extend:
            break
        nxt = best / factor if best == grid[0] else best * factor
        devs[nxt] = dev_of(nxt)
        grid = sorted([*grid, nxt])
    best = min(grid, key=lambda x: (devs[x] if math.isfinite(devs[x]) else math.inf, x))
    edge = len(grid) >= 3 and best in (grid[0], grid[-1])
    return best, grid, devs, edge
