"""neuron_peft: neuron-level selective fine-tuning as a Hugging Face PEFT method.

`import neuron_peft` registers the method with PEFT (peft type ``NEURON_SELECT``, prefix ``neuron_select_``), so
`get_peft_model`, `PeftModel.from_pretrained`, `AutoPeftModel*` and transformers' `load_adapter` work with it.
"""

from .registration import NEURON_SELECT_PEFT_TYPE, register

register()

from .config import NeuronSelectConfig  # noqa: E402
from .layer import Linear, NeuronSelectLayer, mark_adapter_updated  # noqa: E402
from .model import AdapterMismatchError, NeuronSelectModel, NonFiniteDeltaError, allow_nonfinite  # noqa: E402
from .routing import RoutingError, group_ids, route  # noqa: E402
from .selection import NeuronSelection, select_neurons  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "NEURON_SELECT_PEFT_TYPE",
    "AdapterMismatchError",
    "Linear",
    "NeuronSelectConfig",
    "NeuronSelectLayer",
    "NeuronSelectModel",
    "NonFiniteDeltaError",
    "allow_nonfinite",
    "mark_adapter_updated",
    "NeuronSelection",
    "select_neurons",
    "route",
    "group_ids",
    "RoutingError",
]
