"""quality.py's method names, their learning-rate family and description: the table the presets list methods from.

Its own module, importing nothing, so that `preset` (whose presets name methods) and `methods` (which builds them
and needs a `Preset`) both read it and imports flow one way: methods -> preset -> method_names.
"""

from __future__ import annotations

# name -> (family for the LR grid, description)
METHODS = {
    "zero-shot": ("none", "base model, no training"),
    "full": ("full", "full fine-tuning, all parameters"),
    "lora-r8": ("lora", "LoRA r=8, all linear"),
    "lora-r16": ("lora", "LoRA r=16, all linear"),
    "dora-r16": ("lora", "DoRA r=16, all linear"),
    "ns-0.4": ("neuron", "NeuronSelect, Taylor, layer ratio 0.4, routing"),
    "ns-0.8": ("neuron", "NeuronSelect, Taylor, layer ratio 0.8, routing"),
    "ns-0.4-agnostic": ("neuron", "ablation: ns-0.4 agnostic rows only"),
    "ns-0.4-specific": ("neuron", "ablation: ns-0.4 language rows only, routing"),
    "ns-all-layers": ("neuron", "ablation: Taylor, layer ratio 1.0, routing"),
    "ns-0.4-random": ("neuron", "ablation: random rows, ns-0.4 budget, no routing"),
    "ns-0.4-magnitude": ("neuron", "ablation: largest-norm rows, ns-0.4 budget, no routing"),
}
NS_RATIOS = {"ns-0.4": 0.4, "ns-0.8": 0.8, "ns-all-layers": 1.0}
ALL_METHODS = tuple(METHODS)
