"""Adapt: the NeuronSelect PEFT method itself (PEFT's tuner contract: config, layer, model).

* `config.py` — `NeuronSelectConfig`, the whole adapter description (which rows of which layers, who owns them).
* `layer.py` — the tuner layer: row deltas, merge / unmerge, the forward paths; `autograd.py` — their sparse
  backward (live rows, additive rows, dense delta).
* `model.py` — `NeuronSelectModel`, the thin `BaseTuner` that injects layers and resolves rows;
  `adapter_file.py` checks adapter files on load, `summary.py` reports what an adapter trains,
  `unsupported.py` names the PEFT methods that do not apply.
* `routing.py` — per-sample language routing of the weight gradients; `groups_keyword.py` — how the
  ``neuron_groups`` keyword reaches it; `packed_patches.py` — routing for packed-patch vision towers.
* `peft_type.py` / `registration.py` — the method's PEFT identity and its registration (run last, below: the only
  change made to PEFT); `model_card.py` — the NeuronSelect part of the adapter's model card, written from PEFT's
  own save steps.

Nothing here imports `neuron_peft.selection`, `neuron_peft.data` or `neuron_peft.integrations`: the tuner works on
any rows, however they were chosen.
"""

from .config import NeuronSelectConfig
from .layer import Linear, NeuronSelectLayer, mark_adapter_updated
from .model import NeuronSelectModel, allow_nonfinite, pick_rows
from .peft_type import NEURON_SELECT_PEFT_TYPE, PREFIX
from .registration import register
from .routing import group_ids, route

register()

__all__ = [
    "NEURON_SELECT_PEFT_TYPE",
    "PREFIX",
    "Linear",
    "NeuronSelectConfig",
    "NeuronSelectLayer",
    "NeuronSelectModel",
    "allow_nonfinite",
    "group_ids",
    "mark_adapter_updated",
    "pick_rows",
    "register",
    "route",
]
