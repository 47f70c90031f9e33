"""Selection units: output rows, input channels ("columns") of output projections, and whole MLP neurons.

A row of a Linear layer is what one output neuron writes; the MLP's neuron j and an attention head are better
seen from the other side, as what an output projection *reads*: neuron j reads through ``gate_proj`` / ``up_proj``
row j and writes through ``down_proj`` column j, and the heads write through ``o_proj``'s columns. The units:

* ``"row"`` (the default): the output rows of every targeted Linear, scored by ``|a_i * dL/da_i|`` of its outputs.
* ``"channel"``: the input columns of the *output projections* among the targeted layers (``o_proj``, ``down_proj``;
  GPT-2's ``attn.c_proj`` and ``mlp.c_proj``), scored by ``|x_j * dL/dx_j|`` of the layer's input. Other targeted
  layers (q/k/v, gate/up, ...) are not output projections and get nothing. A column of an (out, in) layer holds
  ``out_features`` weights.
* ``"mlp_neuron"``: MLP blocks only (attention is not part of this unit). Neuron j of a block scores as column j of
  its writer (``h_j`` = the gate * up product that ``down_proj`` reads; ``|h_j * dL/dh_j|``), and a chosen j trains
  ``gate_proj`` and ``up_proj`` row j (GPT-2: ``mlp.c_fc`` output j) with ``down_proj`` column j (GPT-2:
  ``mlp.c_proj`` column j). A block takes part when its writer is among the targeted layers; its readers are found
  beside it by name and train with it whether targeted or not. A neuron holds ``out_features`` weights of the writer
  plus ``in_features`` of each reader.

Blocks and projections are found by module names (Llama / Gemma / Qwen / Mistral-style models and GPT-2); a model
without them gets a ValueError naming what was looked for and the targeted layers' name suffixes. Every other step
(group normalisation, variance split, owner, the ``row_selection`` budgets) treats a unit as it treats a row.
"""

from __future__ import annotations

from torch import nn

from .targets import _linear_in, _linear_out

UNITS = ("row", "channel", "mlp_neuron")
OUTPUT_PROJECTIONS = ("o_proj", "down_proj", "attn.c_proj", "mlp.c_proj")
# (writer, readers): the MLP blocks mlp_neuron knows, by dotted name suffix
MLP_BLOCKS = (("mlp.down_proj", ("mlp.gate_proj", "mlp.up_proj")), ("mlp.c_proj", ("mlp.c_fc",)))
# what summary() calls a unit, and says it is
UNIT_LABELS = {"row": "rows", "channel": "columns", "mlp_neuron": "neurons"}
UNIT_TEXT = {
    "row": "output rows of the targeted layers",
    "channel": "input columns of the output projections (o_proj, down_proj, GPT-2 c_proj)",
    "mlp_neuron": "MLP neuron j = row j of gate_proj and up_proj (GPT-2 c_fc) + column j of down_proj (c_proj)",
}
_BLOCKS_TEXT = "mlp.down_proj with mlp.gate_proj and mlp.up_proj (Llama / Gemma / Qwen / Mistral) or mlp.c_proj "
_BLOCKS_TEXT += "with mlp.c_fc (GPT-2)"


def _ends_with(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def _suffixes(names: list[str]) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n in names})


def check_unit(unit, layer_scoring: str, layers=None, readers=None) -> str:
    """A known unit; activation similarity compares layer *outputs* and ranks layers, not input channels, so only
    ``unit="row"`` may use it. Checked before scoring and on every `NeuronSelection.decide` (which also passes its
    layers and readers: an mlp_neuron selection needs the readers of every scored writer)."""
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
    if unit != "row" and layer_scoring == "activation_similarity":
        raise ValueError(f"unit={unit!r} scores input channels by Taylor importance; layer_scoring="
                         "'activation_similarity' compares layer outputs and works with unit='row' only")  # fmt: skip
    missing = [n for n in layers or [] if not (readers or {}).get(n)] if unit == "mlp_neuron" else []
    if missing:
        raise ValueError(f"unit='mlp_neuron': no readers recorded for {missing[:3]} (readers={{writer: {{reader: "
                         "in_features}}}} is required)")  # fmt: skip
    return unit


def output_projections(names: list[str]) -> list[str]:
    """The output projections among `names` (full module names), in order; ValueError when there are none."""
    found = [n for n in names if any(_ends_with(n, s) for s in OUTPUT_PROJECTIONS)]
    if not found:
        raise ValueError(
            f"unit='channel' found no output projection among the targeted layers: looked for names ending in "
            f"{list(OUTPUT_PROJECTIONS)}; the targeted layers' name suffixes are {_suffixes(names)}"
        )
    return found


def mlp_blocks(model: nn.Module, names: list[str]) -> dict[str, dict[str, int]]:
    """``{writer: {reader: reader in_features}}`` for every MLP block whose writer is among `names`.

    Raises ValueError when there is no block, or when a writer's readers are missing or do not produce its inputs
    (then the block is not the gate/up -> down shape this unit assumes)."""
    modules = dict(model.named_modules())
    blocks: dict[str, dict[str, int]] = {}
    for name in names:
        for writer, readers in MLP_BLOCKS:
            if not _ends_with(name, writer):
                continue
            prefix = name[: len(name) - len(writer.rsplit(".", 1)[-1])]
            found = {prefix + r.rsplit(".", 1)[-1]: modules.get(prefix + r.rsplit(".", 1)[-1]) for r in readers}
            missing = [r for r, m in found.items() if m is None or _linear_out(m) is None]
            if missing:
                raise ValueError(f"unit='mlp_neuron': {name!r} has no Linear {missing} beside it; an MLP block is "
                                 f"{_BLOCKS_TEXT}")  # fmt: skip
            w = modules[name]
            for r, m in found.items():
                if _linear_out(m) != _linear_in(w) or isinstance(m, nn.Linear) != isinstance(w, nn.Linear):
                    raise ValueError(
                        f"unit='mlp_neuron': {r!r} ({type(m).__name__}, {_linear_out(m)} outputs) does not feed "
                        f"{name!r} ({type(w).__name__}, {_linear_in(w)} inputs) one to one"
                    )
            blocks[name] = {r: int(_linear_in(m)) for r, m in found.items()}
    if not blocks:
        raise ValueError(
            f"unit='mlp_neuron' found no MLP block among the targeted layers: looked for {_BLOCKS_TEXT}; the "
            f"targeted layers' name suffixes are {_suffixes(names)}"
        )
    return blocks


def unit_layers(model: nn.Module, names: list[str], unit: str) -> tuple[list[str], dict[str, dict[str, int]]]:
    """(the layers whose units are scored, ``{writer: {reader: in_features}}`` for mlp_neuron else {})."""
    if unit == "channel":
        return output_projections(names), {}
    if unit == "mlp_neuron":
        blocks = mlp_blocks(model, names)
        return list(blocks), blocks
    return list(names), {}


def unit_counts(unit: str, out_features: list[int], in_features: list[int]) -> list[int]:
    """Units per scored layer: its output rows, or (channel, mlp_neuron) its input channels."""
    return list(out_features) if unit == "row" else list(in_features)


def unit_costs(unit, layers, out_features, in_features, readers) -> list[int]:
    """Weights one unit of each scored layer trains: a row ``in_features``, a column ``out_features``, an MLP neuron
    its writer column plus one row of each reader (what ``weight_ratio`` and `trained_weights` count)."""
    if unit == "row":
        return list(in_features)
    if unit == "channel":
        return list(out_features)
    return [n_out + sum(readers[n].values()) for n, n_out in zip(layers, out_features)]


def assign_units(unit, agnostic, specific, readers) -> dict:
    """The chosen units as `NeuronSelectConfig`'s dicts: ``neurons`` / ``language_neurons`` (rows) and ``columns`` /
    ``language_columns``. `agnostic` is ``{layer: [unit]}``, `specific` ``{group: {layer: [unit]}}``; mlp_neuron
    gives the same j to the writer's column and to each reader's row."""
    out = {"neurons": {}, "language_neurons": {}, "columns": {}, "language_columns": {}}
    if unit == "row":
        out["neurons"], out["language_neurons"] = agnostic, specific
        return out
    out["columns"], out["language_columns"] = agnostic, specific
    if unit == "mlp_neuron":
        out["neurons"] = {r: list(units) for n, units in agnostic.items() for r in readers[n]}
        out["language_neurons"] = {
            g: {r: list(units) for n, units in layers.items() for r in readers[n]} for g, layers in specific.items()
        }
    return out
