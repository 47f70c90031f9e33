"""Register NeuronSelect with PEFT without patching PEFT's source.

PEFT keys every method by a member of its `PeftType` enum, and transformers' `load_adapter` reads
`peft_type.value.lower()` to find adapter tensors by prefix. There is no public way to add a member out of tree,
so we add one at import time. This touches private `enum` internals; it is isolated here and tested.
"""

from __future__ import annotations

import enum

from peft.utils import PeftType, register_peft_method

NAME = "neuron_select"
PREFIX = "neuron_select_"


def _add_enum_member(enum_cls: type[enum.Enum], name: str, value: str) -> enum.Enum:
    """Add `name = value` to a str-valued Enum as if it had been declared in the class body."""
    if name in enum_cls.__members__:
        return enum_cls[name]
    member = str.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    if hasattr(enum_cls, "_add_member_"):  # Python >= 3.13 keeps extra bookkeeping here
        enum_cls._add_member_(name, member)
    else:
        enum_cls._member_map_[name] = member
        type.__setattr__(enum_cls, name, member)
    if name not in enum_cls._member_names_:
        enum_cls._member_names_.append(name)
    enum_cls._value2member_map_[value] = member
    return member


NEURON_SELECT_PEFT_TYPE = _add_enum_member(PeftType, NAME.upper(), NAME.upper())


def register() -> None:
    """Put NeuronSelect into PEFT's method tables (idempotent)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    from .config import NeuronSelectConfig
    from .model import NeuronSelectModel

    _wrap_weight_loader()
    _wrap_model_card()
    _wrap_special_forward_args()
    if PEFT_TYPE_TO_CONFIG_MAPPING.get(NEURON_SELECT_PEFT_TYPE) is NeuronSelectConfig:
        return
    register_peft_method(name=NAME, config_cls=NeuronSelectConfig, model_cls=NeuronSelectModel, prefix=PREFIX)


class AdapterFileError(ValueError):
    """An adapter weights file is unreadable (corrupt or truncated)."""


def _wrap_once(owner, name: str, make) -> None:
    """Replace ``owner.name`` by ``make(original)`` unless already done (import is idempotent, wrappers never stack)."""
    original = getattr(owner, name)
    if getattr(original, "_neuron_peft_wrapped", False):
        return
    wrapped = make(original)
    wrapped._neuron_peft_wrapped = True
    wrapped.__wrapped__ = original
    setattr(owner, name, wrapped)


def _wrap_weight_loader() -> None:
    """Make PEFT name the file when safetensors cannot read it, instead of a bare header error."""
    import peft.utils.save_and_load as sl

    def make(original):
        def safe_load_file(filename, *args, **kwargs):
            try:
                return original(filename, *args, **kwargs)
            except Exception as err:  # safetensors raises its own SafetensorError (not an OSError) for bad files
                unreadable = type(err).__name__ == "SafetensorError" or (
                    isinstance(err, (EOFError, OSError)) and "safetensors" in str(filename)
                )
                if unreadable:
                    raise AdapterFileError(f"corrupt or truncated adapter file {filename}: {err}") from err
                raise

        return safe_load_file

    _wrap_once(sl, "safe_load_file", make)


def _card_section(summary: dict) -> str:
    lines = [
        "## NeuronSelect adapter",
        "",
        "Neuron-level selective fine-tuning (neuron_peft): only selected output rows of Linear layers train.",
        "",
        f"- adapted layers: {summary['layers']}",
        f"- selected rows: {summary['rows']} ({100 * summary['rows_of_targeted']:.2f}% of the rows of adapted layers)",
        f"- trainable parameters: {summary['trainable_params']:,} ({summary['trainable_percent']:.4f}% of the base model)",
    ]
    if summary["language_rows"]:
        lines.append("- language-specific rows: " + ", ".join(f"{g}: {n}" for g, n in summary["language_rows"].items()))
    return "\n".join(lines) + "\n"


def _wrap_model_card() -> None:
    """Add a NeuronSelect section (layers, rows, trainable %) and tag to the model card PEFT writes on save."""
    import os

    from huggingface_hub import ModelCard
    from peft import PeftModel

    def make(original):
        def create_or_update_model_card(self, output_dir: str):
            original(self, output_dir)
            summary = getattr(self.base_model, "selection_summary", None)
            if summary is None or getattr(self.active_peft_config, "peft_type", None) != NEURON_SELECT_PEFT_TYPE:
                return
            path = os.path.join(output_dir, "README.md")
            card = ModelCard.load(path)
            card.data.tags = sorted(set(card.data.tags or []) | {"neuron-select", "peft"})
            block, text = _card_section(summary()), card.text
            if "## NeuronSelect adapter" in text:  # saving again replaces the section
                head, _, rest = text.partition("## NeuronSelect adapter")
                nxt = rest.find("\n## ")
                text = head + block + (rest[nxt + 1 :] if nxt >= 0 else "")
            else:
                text = text.rstrip("\n") + "\n\n" + block
            card.text = text
            card.save(path)

        return create_or_update_model_card

    _wrap_once(PeftModel, "create_or_update_model_card", make)


def _wrap_special_forward_args() -> None:
    """Let PeftModel strip `neuron_groups` from forward/generate calls, as it does for LoRA's `adapter_names`."""
    from peft import PeftModel

    def make(original):
        def __init__(self, model, peft_config, *args, **kwargs):
            original(self, model, peft_config, *args, **kwargs)
            if getattr(peft_config, "peft_type", None) == NEURON_SELECT_PEFT_TYPE:
                self.special_peft_forward_args = set(self.special_peft_forward_args) | {"neuron_groups"}

        return __init__

    _wrap_once(PeftModel, "__init__", make)
