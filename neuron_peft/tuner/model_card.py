"""The NeuronSelect part of an adapter's model card (README.md): how to install and load it, and what it trains.

PEFT writes the card (``library_name: peft``, base model, tags, framework versions) at the start of
``PeftModel.save_pretrained``, then saves each adapter's tensors and config. The tuner takes the adapter's summary when
PEFT asks it for the tensors to save (``NeuronSelectModel._get_adapter_state_dict``) and
`NeuronSelectConfig.save_pretrained`, which PEFT calls last, adds it to that card: PEFT's own save path, no patched
PEFT function. `update_model_card` adds one block between two HTML-comment markers, so saving again replaces the
block and leaves the rest of the card, including the author's edits, alone; the first save puts it right under the
title. The block opens with the usage section (``pip install neuron-peft`` and a load snippet
that imports ``neuron_peft``: without that import PEFT cannot load the adapter, see `neuron_peft.tuner.peft_type`),
then states the base model, target modules, selected rows per module type, language groups, trainable parameters
(PEFT's ``get_nb_trainable_parameters``, the numbers ``print_trainable_parameters()`` prints) and the settings.
"""

from __future__ import annotations

import os
import time
from typing import Optional

BEGIN = "<!-- neuron_peft:begin (written by neuron_peft on every save; edits between these markers are replaced) -->"
END = "<!-- neuron_peft:end -->"
TAGS = ("neuron-select", "peft")
USAGE_HEADING = "## How to Get Started with the Model"
# the body huggingface_hub's default template (which PEFT uses) puts under USAGE_HEADING
_TEMPLATE_USAGE = ("Use the code below to get started with the model.", "[More Information Needed]")

# PEFT task types -> the AutoPeftModel class that loads them (peft.auto); None (no task type) -> AutoPeftModel
_AUTO_CLASSES = {
    None: "AutoPeftModel",
    "CAUSAL_LM": "AutoPeftModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoPeftModelForSeq2SeqLM",
    "SEQ_CLS": "AutoPeftModelForSequenceClassification",
    "TOKEN_CLS": "AutoPeftModelForTokenClassification",
    "QUESTION_ANS": "AutoPeftModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoPeftModelForFeatureExtraction",
}


def trainable_line(trainable: int, total: int) -> str:
    """The line ``PeftModel.print_trainable_parameters()`` prints, for the same two numbers."""
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


def load_snippet(config, adapter: str, adapter_id: str) -> str:
    """Python that loads adapter `adapter` (its `config`) in a fresh process (the card's usage block)."""
    task = getattr(config, "task_type", None)
    task = getattr(task, "value", task)
    auto = _AUTO_CLASSES.get(task)
    sub = "" if adapter == "default" else f", subfolder={adapter!r}"
    lines = [
        "import neuron_peft  # registers the NEURON_SELECT method with PEFT; without it: KeyError: 'NEURON_SELECT'"
    ]
    if auto is not None and config.base_model_name_or_path:
        lines += [
            f"from peft import {auto}",
            "",
            f"adapter = {str(adapter_id)!r}  # this adapter's Hub id or local folder",
            f"model = {auto}.from_pretrained(adapter{sub})  # loads the base model {config.base_model_name_or_path!r} too",
        ]
    else:  # no recorded base model (or an unusual task type): the user loads the base model themselves
        lines += [
            "from peft import PeftModel",
            "",
            f"adapter = {str(adapter_id)!r}  # this adapter's Hub id or local folder",
            "base_model = ...  # the model this adapter was trained on (its name was not recorded)",
            f"model = PeftModel.from_pretrained(base_model, adapter{sub})",
        ]
    return "\n".join(lines)


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.2f}%" if whole else "n/a"


def card_block(summary: dict, config, adapter_id: str) -> str:
    """The generated Markdown block (usage first, then the adapter's facts), between the markers.

    `summary` is `NeuronSelectModel.selection_summary` of the adapter (plain data, taken while the model was at
    hand), `config` its `NeuronSelectConfig`, `adapter_id` the Hub id or folder the load snippet names."""
    s = summary
    base = config.base_model_name_or_path or "not recorded"
    targets = s["target_modules"]
    targets = ", ".join(f"`{t}`" for t in targets) if isinstance(targets, list) else f"`{targets}` (regex)"
    per_type = "; ".join(
        f"`{kind}` {v['rows']} of {v['out_features']} rows ({_pct(v['rows'], v['out_features'])}) in {v['layers']} "
        f"layer{'s' if v['layers'] != 1 else ''}"
        + (f", {v['columns']} of {v['in_features']} input columns" if v.get("columns") else "")
        for kind, v in s["module_types"].items()
    )
    if s["groups"]:
        shared = s["rows"] - sum(s["language_rows"].values())
        groups = (
            f"{len(s['groups'])}: "
            + ", ".join(f"`{g}` ({s['language_rows'].get(g, 0)} rows)" for g in s["groups"])
            + f"; {shared} rows shared by all groups. Training routes each group's rows to that group's samples "
            "(`neuron_groups`); inference uses every row for every input."
        )
    else:
        groups = "none (every selected row is shared by all inputs)"
    total_rows = sum(v["out_features"] for v in s["module_types"].values())
    settings = ", ".join(f"{k}={v!r}" for k, v in s["settings"].items())
    trainable = trainable_line(s["trainable_params"], s["all_params"])
    if s["trainable_params"] == 0:
        trainable += " (nothing was trainable when saved, e.g. an adapter loaded for inference)"
    lines = [
        BEGIN,
        "This is a **NeuronSelect** adapter (neuron-level selective fine-tuning, package `neuron-peft`): only "
        'selected output rows ("neurons") of Linear layers of the base model were trained; the adapter stores '
        "their deltas and indices.",
        "",
        USAGE_HEADING,
        "",
        "```bash",
        "pip install neuron-peft",
        "```",
        "",
        "```python",
        load_snippet(config, s["adapter"], adapter_id),
        "```",
        "",
        "`import neuron_peft` must come before loading: it registers the `NEURON_SELECT` PEFT type. PEFT cannot find "
        "the package that defines a method from the adapter files, so without the import every loader "
        "(`PeftModel.from_pretrained`, `AutoPeftModel*`, transformers' `from_pretrained` / `load_adapter`) stops with "
        "`KeyError: 'NEURON_SELECT'`. After the import, `merge_and_unload()` gives a plain transformers model.",
        "",
        "## NeuronSelect adapter",
        "",
        f"- base model: `{base}`",
        f"- target modules: {targets}",
        f"- adapted layers: {s['layers']}; selected rows: {s['rows']} of their {total_rows} output rows "
        f"({_pct(s['rows'], total_rows)})",
        f"- selected rows per module type: {per_type or 'none'}",
        *(
            [
                f"- selected input columns: {s['columns']} (a column trains one input channel's weights into every "
                "output row not selected as a row)"
                + (
                    "; owned by groups: " + ", ".join(f"`{g}` {n}" for g, n in s["language_columns"].items() if n)
                    if any(s.get("language_columns", {}).values())
                    else ""
                )
            ]
            if s.get("columns")
            else []
        ),
        f"- language groups: {groups}",
        f"- trainable parameters (PEFT's `get_nb_trainable_parameters()`, as `print_trainable_parameters()` prints: "
        f"parameters with `requires_grad` — row deltas, bias deltas when `train_bias`, `modules_to_save` copies — over "
        f"all parameters of the adapted model, adapters included): {trainable}",
        f"- adapter parameters: {s['adapter_params']:,d} (row, bias and column deltas of adapter `{s['adapter']}`)",
        f"- settings: {settings}",
        END,
    ]
    return "\n".join(lines)


def _splice(text: str, block: str) -> str:
    """Put `block` into the card text: where an earlier block was; else before the first second-level heading (right
    under the title), dropping the template's empty usage section, which the block replaces; else at the end."""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        return head + block + tail
    lines = text.split("\n")
    if USAGE_HEADING in lines:
        i = lines.index(USAGE_HEADING)
        j = next((n for n in range(i + 1, len(lines)) if lines[n].startswith("## ")), len(lines))
        if [ln.strip() for ln in lines[i + 1 : j] if ln.strip()] in (list(_TEMPLATE_USAGE), []):
            lines = lines[:i] + lines[j:]
    first = next((n for n, ln in enumerate(lines) if ln.startswith("## ")), None)
    if first is None:
        return "\n".join(lines).rstrip("\n") + "\n\n" + block + "\n"
    return "\n".join(lines[:first] + [block, ""] + lines[first:])


def update_model_card(card_dir: str, summary: dict, config, adapter_id: Optional[str] = None) -> None:
    """Add (or replace) the NeuronSelect block and tags in ``card_dir/README.md`` (PEFT has written it already)."""
    from huggingface_hub import ModelCard, ModelCardData

    path = os.path.join(card_dir, "README.md")
    card = ModelCard.load(path) if os.path.exists(path) else ModelCard.from_template(ModelCardData())
    card.data.library_name = "peft"
    card.data.tags = sorted(set(card.data.tags or []) | set(TAGS))
    card.text = _splice(card.text, card_block(summary, config, adapter_id or card_dir))
    card.save(path)


# The hand-over between PEFT's two save steps that reach NeuronSelect code: the tuner's `_get_adapter_state_dict`
# (model at hand, card already written) and the config's `save_pretrained` (folder known, tensors written). Plain data
# on the config instance, never a dataclass field (so never in adapter_config.json), consumed by the save it belongs to.
_PENDING = "_neuron_select_pending_card"
# PEFT's weight files; a card is only written beside one saved after the summary was taken (file-time slack: coarse
# filesystem clocks)
_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_MTIME_SLACK_S = 2.0


def take_summary(model, config, adapter_name: str) -> None:
    """Called while PEFT collects `adapter_name`'s tensors: if `model` is a PeftModel whose active adapter this is
    (PEFT's card describes the active adapter), keep its summary on `config` for `write_pending_card`."""
    tuner = getattr(model, "base_model", None)
    if getattr(model, "active_adapter", None) != adapter_name or not hasattr(tuner, "selection_summary"):
        return
    config.__dict__[_PENDING] = (tuner.selection_summary(adapter_name), time.time())


def write_pending_card(config, output_dir: str) -> None:
    """Called by `NeuronSelectConfig.save_pretrained`: add the kept summary to the card PEFT wrote for this save
    (``output_dir`` for the default adapter, its parent for a named one). Nothing kept, no card there, or no
    adapter weights in ``output_dir`` written since the summary was taken (a config saved on its own, e.g. after a
    plain ``get_peft_model_state_dict`` call, into a folder holding an older save): nothing written, so a summary
    is never spliced into a card it does not belong to."""
    pending = config.__dict__.pop(_PENDING, None)
    if pending is None:
        return
    summary, taken = pending
    weights = [os.path.join(output_dir, f) for f in _WEIGHT_FILES if os.path.isfile(os.path.join(output_dir, f))]
    if not any(os.path.getmtime(w) >= taken - _MTIME_SLACK_S for w in weights):
        return
    card_dir = output_dir if summary["adapter"] == "default" else os.path.dirname(os.path.normpath(output_dir))
    if os.path.isfile(os.path.join(card_dir, "README.md")):
        update_model_card(card_dir, summary, config)
