"""`register`: put NeuronSelect into PEFT's method tables, through PEFT's own ``register_peft_method``.

This is the one change ``import neuron_peft`` must make to PEFT for the method to exist there (run by
`neuron_peft.tuner`'s ``__init__``, last, as PEFT's own tuner packages do). The enum member it needs comes from
`neuron_peft.tuner.peft_type`.
"""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils import register_peft_method

from .config import NeuronSelectConfig
from .model import NeuronSelectModel
from .peft_type import NAME, NEURON_SELECT_PEFT_TYPE, PREFIX


def register() -> None:
    """Put NeuronSelect into PEFT's method tables (idempotent)."""
    if PEFT_TYPE_TO_CONFIG_MAPPING.get(NEURON_SELECT_PEFT_TYPE) is NeuronSelectConfig:
        return
    register_peft_method(name=NAME, config_cls=NeuronSelectConfig, model_cls=NeuronSelectModel, prefix=PREFIX)
