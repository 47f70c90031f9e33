"""Shared by the multi-process tests (DDP / FSDP2 in `integrations/test_distributed.py`, ZeRO-3 in
`integrations/test_deepspeed.py`): the routed model and data every rank trains, and spawning the ranks."""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
from peft import get_peft_model
from tiny_models import VOCAB, routed_llama_config, tiny_qwen2

from neuron_peft import NeuronSelectConfig

WORLD = 2
STEPS = 3
GROUPS = ["fr", "de"]
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def routed_config(path: str) -> NeuronSelectConfig:
    """3 agnostic rows and 2 rows per language in every targeted layer."""
    return routed_llama_config(GROUPS, update_path=path)


def build(path: str):
    return get_peft_model(tiny_qwen2(seed=0), routed_config(path))


def global_batches():
    """STEPS global batches of 4 samples (equal lengths, no padding) with mixed groups on every rank's half."""
    gen = torch.Generator().manual_seed(5)
    out = []
    for step in range(STEPS):
        ids = torch.randint(1, VOCAB, (4, 9), generator=gen)
        groups = [["fr", "de", "de", "fr"], ["de", "de", "fr", "fr"], ["fr", "fr", "de", "de"]][step % 3]
        out.append((ids, groups))
    return out


def deltas(model) -> dict[str, torch.Tensor]:
    """Every trainable tensor by name, as a full (unsharded) CPU tensor."""
    out = {}
    for name, p in model.named_parameters():
        if "neuron_select_" in name:
            t = p.detach()
            if hasattr(t, "full_tensor"):
                t = t.full_tensor()
            out[name.replace("_fsdp_wrapped_module.", "")] = t.clone().cpu()
    return out


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(worker, out_dir: str, timeout_s: float, what: str) -> list:
    """Spawn `WORLD` processes of ``worker(rank, world, port, out_dir)``, wait at most `timeout_s` (killing any left),
    and return what each rank saved as ``out_dir/rank{r}.pt``."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(worker, args=(WORLD, free_port(), out_dir), nprocs=WORLD, join=False,
                             start_method="spawn")  # fmt: skip
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail(f"{what} did not finish within {timeout_s} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]
