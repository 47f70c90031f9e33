"""PNG plots of a `NeuronSelection` (matplotlib is optional: imported lazily, with a clear error when missing)."""

from __future__ import annotations

import os
from typing import Protocol, Union

from ..fileio import atomic_path


class NeuronSelection(Protocol):
    """What the plots read of a `neuron_peft.selection.result.NeuronSelection` (named here, not imported: the result
    module imports this one, and imports flow one way)."""

    layers: list
    groups: list
    layer_scores: object
    kept_layers: list
    layer_scoring: str
    neurons: dict
    language_neurons: dict

    def neuron_variance(self) -> dict: ...


def _figure(**kwargs):
    """A pyplot-free Figure (no global state, no GUI backend needed)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("plotting needs matplotlib: pip install matplotlib (or neuron-peft[bench])") from e
    return Figure(**kwargs)


def _save(fig, path: Union[str, os.PathLike]) -> None:
    """Write the PNG atomically, so a reader (or an interrupted run) never leaves a truncated image."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)


def plot_layer_heatmap(selection: NeuronSelection, path: Union[str, os.PathLike]) -> None:
    """Layers (rows) x groups (columns) heatmap of `layer_scores`; kept layers are starred."""
    scores = selection.layer_scores.float().numpy()
    kept = set(selection.kept_layers)
    n_layers, n_groups = scores.shape
    fig = _figure(figsize=(2.5 + 0.9 * n_groups, 1.5 + 0.22 * n_layers), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(scores, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(n_groups), selection.groups, rotation=45, ha="right")
    ax.set_yticks(range(n_layers), [("* " if n in kept else "") + n for n in selection.layers], fontsize=7)
    label = "1 - activation similarity" if selection.layer_scoring == "activation_similarity" else "Taylor layer score"
    fig.colorbar(im, ax=ax, label=label)
    ax.set_title(f"layer importance (* = kept, {len(kept)}/{n_layers})")
    _save(fig, path)


def plot_neuron_variance(selection: NeuronSelection, path: Union[str, os.PathLike]) -> None:
    """Per kept layer, the trained units' variance across groups, sorted descending (log y); dots mark the specific
    cut."""
    import torch

    variance = selection.neuron_variance()
    fig = _figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    agnostic, language = selection.chosen_units()  # rows, or columns for the column units
    for name in selection.kept_layers:
        rows = list(agnostic.get(name, []))
        rows += [r for g in language.values() for r in g.get(name, [])]
        v = torch.sort(variance[name][rows], descending=True).values.numpy()
        x = torch.linspace(0, 1, len(v)).numpy()
        (line,) = ax.plot(x, v + 1e-12, lw=1, label=name)
        n_spec = sum(len(r.get(name, [])) for r in language.values())
        if 0 < n_spec <= len(v):
            ax.plot([x[n_spec - 1]], [v[n_spec - 1] + 1e-12], "o", ms=3, color=line.get_color())
    ax.set_yscale("log")
    ax.set_xlabel(f"rank among the layer's trained {'rows' if selection.unit == 'row' else 'units'} (fraction)")
    ax.set_ylabel("variance of normalised score across groups")
    ax.set_title("neuron variance per kept layer (dot = last language-specific row)")
    if len(selection.kept_layers) <= 12:
        ax.legend(fontsize=6)
    _save(fig, path)
