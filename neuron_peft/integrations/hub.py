"""Pushing a NeuronSelect adapter to the Hub with its model card: an explicit call, nothing patched.

``peft_model.push_to_hub(repo_id)`` works as for every PEFT adapter and uploads what ``save_pretrained`` writes, with
one difference it shares with LoRA: transformers' ``PushToHubMixin.push_to_hub`` (5.x) replaces the README.md that
``save_pretrained`` wrote with the Hub repo's card (or a blank template) right before uploading, so the pushed card
does not carry the NeuronSelect part (usage snippet with ``import neuron_peft``, selection summary). `push_to_hub`
here gives the same upload with that part re-applied on top of the Hub's card, the snippet naming the repo id.

It does so for this one call only: the instance gets an ``_upload_modified_files`` (the method transformers calls
with the folder it is about to upload) that first updates the card there, then uploads as transformers would; the
attribute is removed afterwards. Where transformers has no such method the push goes ahead with the Hub's card.
"""

from __future__ import annotations

from ..tuner.model_card import update_model_card
from ..tuner.peft_type import NEURON_SELECT_PEFT_TYPE

__all__ = ["push_to_hub"]


def push_to_hub(peft_model, repo_id: str, *args, **kwargs):
    """``peft_model.push_to_hub(repo_id, *args, **kwargs)``, keeping the NeuronSelect part of the model card."""
    config = getattr(peft_model, "active_peft_config", None)
    upload = getattr(peft_model, "_upload_modified_files", None)
    if getattr(config, "peft_type", None) != NEURON_SELECT_PEFT_TYPE or upload is None:
        return peft_model.push_to_hub(repo_id, *args, **kwargs)
    adapter = peft_model.active_adapter

    def _upload_modified_files(working_dir, repo_id_, *a, **k):
        peft_model.create_or_update_model_card(working_dir)  # PEFT's card fields on the Hub's card
        summary = peft_model.base_model.selection_summary(adapter)
        update_model_card(working_dir, summary, config, adapter_id=repo_id_)  # our part, the snippet names the repo
        return upload(working_dir, repo_id_, *a, **k)

    peft_model.__dict__["_upload_modified_files"] = _upload_modified_files
    try:
        return peft_model.push_to_hub(repo_id, *args, **kwargs)
    finally:
        peft_model.__dict__.pop("_upload_modified_files", None)
