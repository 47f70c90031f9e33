"""Score: which layers and rows train, and who owns them (MNAFT / LLaVA-NeuMT neuron selection).

`select_neurons` streams calibration batches per group (a language pair or task) through the model once and
scores every output neuron of every targeted Linear by first-order Taylor importance
``mean_tokens |a_i * dL/da_i|``. Layers are ranked (Taylor layer mean, or activation similarity to a fine-tuned
reference model) and the top ``layer_ratio`` kept per model part; inside a kept layer the most important
``neuron_ratio`` rows train, and the ``specific_ratio`` of those whose importance varies most across groups become
language-specific rows owned by the group that needs them most. The result, `NeuronSelection`, turns into a
`NeuronSelectConfig` with `to_config()`.

Conventions (documented here because they change the numbers):

* Loss tokens. For a causal LM the logits at position t predict ``labels[:, t+1]``, so an activation position t
  counts iff ``labels[:, t+1] != -100`` (the positions that produce a loss term; the last position never does).
  Outputs whose leading dims are not (batch, seq) — e.g. a vision tower's patches — count every position.
* Gradient scale. Gradients are of the *summed* token loss (the model's mean loss times its number of loss
  tokens), so a score does not depend on how the data is batched.
* The model runs in eval mode (no dropout) with all parameters frozen; gradients are taken w.r.t. the layer
  outputs only (`torch.autograd.grad`), so no parameter changes and no ``.grad`` is written. Training flags and
  ``requires_grad`` flags are restored afterwards.
* Taylor layer score (MNAFT eq. 9-11): per group the mean neuron score of the layer, divided by the sum of these
  means over the layers of its part, so each group's layer scores sum to 1 per part; the ranking uses the mean over
  groups. Activation-similarity layer score (NeuMT eq. 3): ``1 - mean cosine(base output, reference output)``
  over the counted tokens; lower similarity = more important.
* Neuron split. Each group's neuron scores are divided by that group's mean over all targeted neurons, so a group
  with a larger loss does not dominate. Importance = mean of the normalised scores over groups; variance =
  population variance over groups; owner = argmax group.
* Ranking options (`select_neurons` keyword arguments, stored on the selection so `decide` repeats them): raw Taylor
  means differ by module type (k/v/o/down_proj sit above q/gate/up_proj), so a raw layer ranking keeps the same
  types; ``score_normalization`` ranks within module type, ``row_selection`` replaces the layer step by the top rows
  of every layer (``"per_layer"``) or one global ranking under a weight budget (``"global"``, ``weight_ratio``).
  ``row_selection="layers"`` is the MNAFT ranking above; the default is ``"per_layer"`` (``"layers"`` with
  activation similarity), chosen by dev NLL in ``benchmarks/selection_value.py``, which measures the alternatives.
* Units (``unit=``). ``"row"`` (default) selects output rows as above; ``"channel"`` selects input columns of the
  output projections (o_proj, down_proj, GPT-2 c_proj) scored by ``|x_j * dL/dx_j|`` of their inputs, and
  ``"mlp_neuron"`` whole MLP neurons (gate/up row j + down column j). Same tokens, normalisation, split and budgets
  (see `channels.py`).

Modules: `calibration.py` (`select_neurons`, the pass over calibration data), `scoring.py` (Taylor importance and
activation similarity per neuron and group), `channels.py` (units: output projections, MLP blocks, unit sizes),
`ranking.py` (choices, ratios, normalisation within module types), `result.py` (`NeuronSelection`: the decision,
``to_config``, save / load), `targets.py` (target matching, model parts, module types), `vlm.py` (per-part targets
and budgets of vision-language models), `plots.py`.
"""

from .calibration import select_neurons
from .channels import MLP_BLOCKS, OUTPUT_PROJECTIONS, UNITS
from .ranking import GROUP_NORMALIZATIONS, ROW_SELECTIONS, SCORE_NORMALIZATIONS
from .result import NeuronSelection
from .scoring import LAYER_SCORINGS, TOKEN_REDUCTIONS, measure_scoring_cost
from .targets import PARTS, model_part, module_type, resolve_target_modules
from .vlm import flatten_targets, select_vlm_neurons, vlm_part_roots, vlm_target_modules

__all__ = [
    "GROUP_NORMALIZATIONS",
    "LAYER_SCORINGS",
    "MLP_BLOCKS",
    "OUTPUT_PROJECTIONS",
    "PARTS",
    "ROW_SELECTIONS",
    "SCORE_NORMALIZATIONS",
    "TOKEN_REDUCTIONS",
    "UNITS",
    "NeuronSelection",
    "flatten_targets",
    "measure_scoring_cost",
    "model_part",
    "module_type",
    "resolve_target_modules",
    "select_neurons",
    "select_vlm_neurons",
    "vlm_part_roots",
    "vlm_target_modules",
]
