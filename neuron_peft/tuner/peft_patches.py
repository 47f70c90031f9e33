"""The three places where neuron_peft changes PEFT / transformers beyond registering the method, all in this module.

PEFT and transformers offer no hook for any of them (checked against peft 0.21.2 and transformers 5.23), so each
wraps one library function; `install` (called once by ``import neuron_peft``, idempotent: wrappers never stack) puts
them in place. Each is NeuronSelect-only or a pure improvement of an error message, and each wrapper carries
``_neuron_peft_wrapped`` and ``__wrapped__`` so it can be found and undone:

1. **A readable error for unreadable adapter files** (`AdapterFileError`): PEFT calls safetensors' ``safe_load_file``
   directly inside ``load_peft_weights``; no tuner or config method runs before it.
2. **The model card.** PEFT builds README.md in ``PeftModel.create_or_update_model_card`` and calls no tuner or
   config method for it (it reads only ``base_model.model_tags``, the base config and the peft type), so the
   NeuronSelect part of the card (`neuron_peft.tuner.model_card`) is added by wrapping that method; adapters of
   other methods pass through untouched.
3. **push_to_hub keeps that card.** transformers' ``PushToHubMixin.push_to_hub`` (5.x) overwrites the README.md that
   ``save_pretrained`` wrote with the Hub repo's card (or a blank template) right before uploading, so the pushed
   card would say nothing about the method. For NeuronSelect adapters the card is re-applied on top of that card
   just before the upload; other adapters pass through untouched.

Not needed any more: a wrapper of ``PeftModel.__init__`` adding ``neuron_groups`` to ``special_peft_forward_args``
(see `neuron_peft.tuner.groups_keyword`).
"""

from __future__ import annotations

import peft.utils.save_and_load as sl
from peft import PeftModel

from ..errors import AdapterFileError
from .model_card import update_model_card
from .peft_type import NEURON_SELECT_PEFT_TYPE


def install() -> None:
    """Put the three wrappers in place (idempotent)."""
    _wrap_weight_loader()
    _wrap_model_card()
    _wrap_push_to_hub()


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


def is_neuron_select(peft_model) -> bool:
    """Whether a PeftModel's active adapter is a NeuronSelect adapter."""
    config = getattr(peft_model, "active_peft_config", None)
    return getattr(config, "peft_type", None) == NEURON_SELECT_PEFT_TYPE


def _wrap_model_card() -> None:
    """After PEFT writes its card on save, add the NeuronSelect part (usage, selection summary); see point 2 above."""

    def make(original):
        def create_or_update_model_card(self, output_dir: str):
            original(self, output_dir)
            if is_neuron_select(self):
                update_model_card(self, output_dir, adapter_id=output_dir)

        return create_or_update_model_card

    _wrap_once(PeftModel, "create_or_update_model_card", make)


def _wrap_push_to_hub() -> None:
    """Re-apply the card that ``save_pretrained`` wrote after transformers replaced it on push; see point 3 above.

    transformers' ``push_to_hub`` saves into a temporary folder, overwrites its README.md with the Hub's card, then
    calls ``self._upload_modified_files(folder, repo_id, ...)``. For this one call the instance gets an
    ``_upload_modified_files`` that first updates the card in that folder (PEFT's part, then ours, with the repo id
    in the load snippet) and then uploads as transformers would. Where transformers has no such method the push
    goes ahead unchanged (with the Hub's card).
    """

    def make(original):
        def push_to_hub(self, repo_id: str, *args, **kwargs):
            upload = getattr(self, "_upload_modified_files", None)
            if not is_neuron_select(self) or upload is None:
                return original(self, repo_id, *args, **kwargs)

            def _upload_modified_files(working_dir, repo_id_, *a, **k):
                self.create_or_update_model_card(working_dir)  # PEFT's card fields (and ours) on the Hub's card
                update_model_card(self, working_dir, adapter_id=repo_id_)  # the load snippet names the repo
                return upload(working_dir, repo_id_, *a, **k)

            self.__dict__["_upload_modified_files"] = _upload_modified_files
            try:
                return original(self, repo_id, *args, **kwargs)
            finally:
                self.__dict__.pop("_upload_modified_files", None)

        return push_to_hub

    _wrap_once(PeftModel, "push_to_hub", make)
