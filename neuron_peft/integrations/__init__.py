"""Training with other libraries' loops: transformers' `Trainer` and a plain accelerate loop (`training.py`).

Both route language-specific rows by each batch's ``neuron_groups``; nothing here changes those libraries.
"""

from .training import NeuronSelectTrainer, answer_loss, train_loop

__all__ = ["NeuronSelectTrainer", "answer_loss", "train_loop"]
