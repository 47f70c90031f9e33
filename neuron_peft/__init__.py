"""neuron_peft: neuron-level selective fine-tuning as a Hugging Face PEFT method.

`import neuron_peft` registers the method with PEFT (peft type ``NEURON_SELECT``, prefix ``neuron_select_``), so
`get_peft_model`, `PeftModel.from_pretrained`, `AutoPeftModel*` and transformers' `load_adapter` work with it. That
registration is the only change the import makes to other libraries: the model card is written from PEFT's own save
steps (`neuron_peft.tuner.model_card`), and pushing with that card is an explicit call
(`neuron_peft.integrations.hub.push_to_hub`).

The method's stages are packages: `neuron_peft.selection` scores neurons and chooses rows, `neuron_peft.tuner` adapts
and routes them (the PEFT method). Around them: `neuron_peft.data` (corpora, prompts, batches),
`neuron_peft.evaluation` (translation and scores), `neuron_peft.integrations` (Trainer, accelerate) and
`neuron_peft.cli`; this module imports only the stages. Every exception a user can catch is in `neuron_peft.errors`.
"""

from .errors import (
    AdapterFileError,
    AdapterMismatchError,
    NonFiniteDeltaError,
    OutputPathError,
    ResourceMissingError,
    RoutingError,
)
from .selection import NeuronSelection, select_neurons
from .tuner import (
    NEURON_SELECT_PEFT_TYPE,
    Linear,
    NeuronSelectConfig,
    NeuronSelectLayer,
    NeuronSelectModel,
    allow_nonfinite,
    group_ids,
    mark_adapter_updated,
    register,
    route,
)

__version__ = "0.1.0"

__all__ = [
    "NEURON_SELECT_PEFT_TYPE",
    "AdapterFileError",
    "AdapterMismatchError",
    "Linear",
    "NeuronSelectConfig",
    "NeuronSelectLayer",
    "NeuronSelectModel",
    "NeuronSelection",
    "NonFiniteDeltaError",
    "OutputPathError",
    "ResourceMissingError",
    "RoutingError",
    "allow_nonfinite",
    "group_ids",
    "mark_adapter_updated",
    "register",
    "route",
    "select_neurons",
]
