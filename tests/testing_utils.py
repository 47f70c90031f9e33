"""Shared test helpers, imported by test files as an ordinary module (PEFT's tests/testing_utils.py pattern).

* dense references for the tuner's tests: an adapted tiny model and a plain copy holding W0 + delta as full
  trainable weights, so every NeuronSelect result can be checked against ordinary autograd;
* `routed_config` (random agnostic and per-language rows), `make_batch` / `calibration` (selection inputs);
* CLI workspaces: `tree_digest` (the reference for "nothing was touched"), `write_tiny_corpus`, `run_cli`;
* `load_benchmark`, which imports a script from benchmarks/ for the smoke tests.

Tiny models and the word-level tokenizer are in `tiny_models.py`.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import torch
from peft import get_peft_model
from tiny_models import TARGETS, make_model
from torch.utils._python_dispatch import TorchDispatchMode

from neuron_peft import NeuronSelectConfig, NeuronSelectLayer

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """A script from benchmarks/ (not a package) as a module named ``<name>_bench``."""
    spec = importlib.util.spec_from_file_location(f"{name}_bench", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def run_selection_value(sv, tmp_path_factory, name: str, argv: list[str]):
    """(results, out folder, log text) of ``selection_value.main(argv + ["--out", <fresh folder>])``."""
    out = tmp_path_factory.mktemp(name) / "out"
    lines: list[str] = []
    results = sv.main([*argv, "--out", str(out)], log=lines.append)
    return results, out, "\n".join(lines)


def build(arch, ratio=0.25, path="auto", train_bias=True, dtype=torch.float32, seed=0):
    base = make_model(arch, seed).to(dtype)
    cfg = NeuronSelectConfig(
        target_modules=TARGETS[arch], neuron_ratio=ratio, neuron_init="random", init_weights=False,
        update_path=path, train_bias=train_bias, fan_in_fan_out=arch == "gpt2",
    )  # fmt: skip
    model = get_peft_model(copy.deepcopy(base), cfg)
    return base, model


def adapted(model):
    """NeuronSelect layers by their name in the base model (works for PeftModel and plain transformers models)."""
    return {
        n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, NeuronSelectLayer)
    }


def dense_reference(base, model):
    """A copy of the base model whose targeted weights hold W + delta as full trainable tensors."""
    ref = copy.deepcopy(base)
    for p in ref.parameters():
        p.requires_grad_(False)
    modules = dict(ref.named_modules())
    for name, layer in adapted(model).items():
        target = modules[name]
        rows = layer.neuron_select_indices["default"]
        with torch.no_grad():
            delta = layer.neuron_select_delta["default"].to(target.weight.dtype)
            if layer.fan_in_fan_out:
                target.weight[:, rows] += delta.t()
            else:
                target.weight[rows] += delta
            if "default" in layer.neuron_select_bias_delta:
                target.bias[rows] += layer.neuron_select_bias_delta["default"].to(target.bias.dtype)
        target.weight.requires_grad_(True)
        if target.bias is not None:
            target.bias.requires_grad_(True)
    return ref


def assert_grads_match(model, ref, atol, rtol=1e-4):
    modules = dict(ref.named_modules())
    for name, layer in adapted(model).items():
        target = modules[name]
        rows = layer.neuron_select_indices["default"]
        wgrad = target.weight.grad.t() if layer.fan_in_fan_out else target.weight.grad
        got = layer.neuron_select_delta["default"].grad
        assert got is not None, name
        torch.testing.assert_close(got, wgrad[rows].to(got.dtype), atol=atol, rtol=rtol, msg=name)
        if "default" in layer.neuron_select_bias_delta:
            bgot = layer.neuron_select_bias_delta["default"].grad
            torch.testing.assert_close(bgot, target.bias.grad[rows].to(bgot.dtype), atol=atol, rtol=rtol, msg=name)


# ------------------------------------------------------------------ routing, CLI workspaces
GROUPS = ["de", "fr", "hi"]


def expected_average(history: list[dict], kind: str, decay: float) -> dict:
    """By hand, what torch's AveragedModel holds after one update per snapshot in ``history`` ({name: tensor} per
    step): the first update copies, the next ones average (``"swa"``: the running mean; ``"ema"``: decay * old +
    (1 - decay) * new)."""
    expected = {}
    for name in history[0]:
        values = [h[name] for h in history]
        if kind == "swa":
            expected[name] = sum(values) / len(values)
        else:
            e = values[0]
            for v in values[1:]:
                e = decay * e + (1 - decay) * v
            expected[name] = e
    return expected


def accelerate_offload(model, how: str, tmp_path) -> None:
    """Offload a tiny 2-block Llama PeftModel's inner model with accelerate: ``"cpu_offload"``, ``"disk_offload"``
    or ``"device_map"`` (block 0 on disk, the rest on the CPU)."""
    from accelerate import cpu_offload, disk_offload, dispatch_model

    inner = model.base_model.model
    if how == "cpu_offload":
        cpu_offload(inner, execution_device="cpu")
    elif how == "disk_offload":
        disk_offload(inner, str(tmp_path), execution_device="cpu")
    else:
        device_map = {"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "cpu",
                      "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}  # fmt: skip
        dispatch_model(inner, device_map=device_map, main_device="cpu", offload_dir=str(tmp_path))


def routed_config(base, arch, path="auto", seed=0):
    """Every targeted layer: 3 agnostic rows and 2 rows per language, chosen at random."""
    gen = torch.Generator().manual_seed(seed)
    neurons, language = {}, {g: {} for g in GROUPS}
    probe = get_peft_model(copy.deepcopy(base), NeuronSelectConfig(target_modules=TARGETS[arch]))
    for name, layer in adapted(probe).items():
        perm = torch.randperm(layer.out_features, generator=gen).tolist()
        neurons[name] = perm[:3]
        for i, g in enumerate(GROUPS):
            language[g][name] = perm[3 + 2 * i : 5 + 2 * i]
    return NeuronSelectConfig(
        target_modules=TARGETS[arch], neurons=neurons, language_neurons=language, init_weights=False,
        update_path=path, fan_in_fan_out=arch == "gpt2",
    )  # fmt: skip


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`, by relative path: the reference for "nothing was touched"."""
    root = Path(root)
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def write_tiny_corpus(path: Path) -> None:
    rows = [
        {"src": "hello world", "tgt": "bonjour le monde", "group": "en-fr"},
        {"src": "hello", "tgt": "hallo welt", "group": "en-de"},
    ] * 4
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def run_cli(argv) -> int:
    """Exit status of ``neuron-peft argv`` run in this process (argparse errors exit through SystemExit)."""
    from neuron_peft import cli

    try:
        return cli.main([str(a) for a in argv])
    except SystemExit as exit_:
        return exit_.code


# ------------------------------------------------------------------ calibration batches for selection
def make_batch(seed, bsz=2, seq=10, prompt=4, **extra):
    """Right-padded batch of token ids below 64 (every tiny model's vocabulary holds them): prompt and padding
    labels are -100; the second sample has 2 padding tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (bsz, seq), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = -100
    attn = torch.ones_like(ids)
    if bsz > 1:
        labels[1, seq - 2 :] = -100
        attn[1, seq - 2 :] = 0
    return dict(input_ids=ids, attention_mask=attn, labels=labels, **extra)


def calibration(seed=0):
    return {"fr": [make_batch(seed), make_batch(seed + 1)], "de": [make_batch(seed + 2)]}


class ShapeRecorder(TorchDispatchMode):
    """Shapes of the tensors newly allocated inside the block (to show no (out, in) weight gradient is formed)."""

    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        """Record the shapes of newly allocated tensors (views of existing storage are free)."""
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in list(args) + list((kwargs or {}).values()) if isinstance(a, torch.Tensor)]
        storages = {a.untyped_storage().data_ptr() for a in inputs}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in storages:
                self.shapes.add(tuple(t.shape))
        return out
