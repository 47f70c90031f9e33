"""Test helpers: dense references for the tuner's tests (an adapted tiny model and a plain copy holding W0 + delta
as full trainable weights, so every NeuronSelect result can be checked against ordinary autograd) and
`load_benchmark`, which imports a script from benchmarks/ for the smoke tests."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import torch
from peft import get_peft_model
from tiny_models import TARGETS, make_model

from neuron_peft import NeuronSelectConfig, NeuronSelectLayer

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """A script from benchmarks/ (not a package) as a module named ``<name>_bench``."""
    spec = importlib.util.spec_from_file_location(f"{name}_bench", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


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
