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

    if PEFT_TYPE_TO_CONFIG_MAPPING.get(NEURON_SELECT_PEFT_TYPE) is NeuronSelectConfig:
        return
    register_peft_method(name=NAME, config_cls=NeuronSelectConfig, model_cls=NeuronSelectModel, prefix=PREFIX)
