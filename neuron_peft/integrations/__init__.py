"""Working with other libraries, each by an explicit call: transformers' `Trainer` and a plain accelerate loop
(`training.py`, both route language-specific rows by each batch's ``neuron_groups``) and pushing to the Hub with
the adapter's model card (`hub.py`). Nothing here changes those libraries.
"""

from .hub import push_to_hub
from .training import NeuronSelectTrainer, answer_loss, labelled_logits_loss, route_groups, train_loop

__all__ = ["NeuronSelectTrainer", "answer_loss", "labelled_logits_loss", "push_to_hub", "route_groups", "train_loop"]
