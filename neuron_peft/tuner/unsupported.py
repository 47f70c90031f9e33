"""PEFT tuner methods NeuronSelect does not implement, each failing with a `NotImplementedError` that says what to do."""

from __future__ import annotations

from typing import Optional


class UnsupportedPeftMethods:
    """PEFT tuner methods NeuronSelect does not implement: each fails with `NotImplementedError` saying what to do.

    Checked against peft 0.21.2: of the public ``PeftModel`` / ``BaseTuner`` / ``LoraModel`` methods, these two are
    LoRA-only and would otherwise end in an unrelated ``AttributeError`` from the base model (PeftModel forwards
    unknown attributes to the tuner, the tuner to the transformers model). The others either work (save/load, adapters
    add/set/delete, merge/unmerge/unload, enable/disable, ``set_requires_grad``, ``get_layer_status``,
    ``get_model_status``, ``low_cpu_mem_usage`` loading) or PEFT already refuses them with a message naming the method
    type: ``convert_to_lora`` (TypeError), hotswapping (ValueError), ``PeftMixedModel`` (ValueError) and
    ``save_pretrained(path_initial_model_for_weight_conversion=...)`` (ValueError).
    """

    def add_weighted_adapter(self, adapters=None, weights=None, adapter_name: Optional[str] = None, *args, **kwargs):
        raise NotImplementedError(
            "add_weighted_adapter is not supported by NeuronSelect: adapters select different rows, so there is no "
            "row-wise weighted sum of their deltas. Instead merge the adapters into the base weights one after the "
            "other (set_adapter(name); merge_adapter()) or merge_and_unload(adapter_names=[...]), then select neurons "
            "again on the merged model and train a new adapter."
        )

    def subtract_mutated_init(self, *args, **kwargs):
        raise NotImplementedError(
            "subtract_mutated_init is LoRA-only (PiSSA/OLoRA/CorDA initialisations that change the base weights); "
            "NeuronSelect never changes the saved base weights, so its adapters need no conversion."
        )
