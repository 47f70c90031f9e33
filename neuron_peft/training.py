"""The documented import path ``neuron_peft.training`` (README, docs, notebook, CLI): the code is in
`neuron_peft.integrations.training`."""

from .integrations.training import NeuronSelectTrainer, answer_loss, labelled_logits_loss, route_groups, train_loop

__all__ = ["NeuronSelectTrainer", "answer_loss", "labelled_logits_loss", "route_groups", "train_loop"]
