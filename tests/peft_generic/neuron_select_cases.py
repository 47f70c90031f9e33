"""NeuronSelect cases for PEFT's generic tuner suite (``tests/test_custom_models.py`` of the installed peft's sdist).

This file is copied next to PEFT's test files and the copy of ``test_custom_models.py`` is patched to extend its
``TEST_CASES`` and ``MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES`` with the lists below, before PEFT's
``@pytest.mark.parametrize`` decorators read them, exactly as PEFT adds one of its own methods. Every case name
contains "NeuronSelect" so ``-k NeuronSelect`` runs only ours (the config-class parametrised tests have the id
``NeuronSelectConfig``). It must import only peft, torch and neuron_peft: it runs inside PEFT's test package.

PEFT's custom models (see ``MockTransformerWrapper`` there): MLP / MLP_LayerNorm ``lin0`` 10->20, ``lin1`` 20->2;
MLP2 ``lin0`` 10->32, ``lin1`` 32->2; EmbConv1D ``conv1d`` (transformers Conv1D, fan-in-fan-out, 5->1) and ``lin0``
10->2; Conv1d ``lin0`` 9->2; Conv2d ``lin0`` 10->2; Conv2d1x1 ``lin0`` 90->2; Conv2d2 ``lin0`` 10->40, ``lin1`` 32->2;
Conv2dGroups ``lin0`` 90->288, ``lin1`` 16->2. Only Linear / Conv1D layers are targeted: NeuronSelect trains output
rows and input columns of Linear layers and refuses convolutions and embeddings.
"""

from __future__ import annotations

import neuron_peft  # noqa: F401  (registers NEURON_SELECT with PEFT)
from neuron_peft import NeuronSelectConfig

# Language-routed rows: agnostic rows in every targeted layer plus rows owned by "fr" / "de". PEFT's tests call the
# model without `neuron_groups`, so only agnostic rows get gradients there (routing itself is tested in
# tests/tuner/test_routing.py); each layer keeps agnostic rows so that PEFT's "every adapter parameter trains" check
# (test_only_params_are_updated) still applies to every delta tensor.
_ROUTED = {
    "neurons": {"lin0": [0, 1, 2], "lin1": [0]},
    "language_neurons": {"fr": {"lin0": [5, 6], "lin1": [1]}, "de": {"lin0": [10]}},
}

# Input columns (`columns` / `language_columns`). A column of lin0 reads PEFT's fixed input (X = arange(90).view(9,
# 10): every column is nonzero on samples 1..8, column 0 is zero on sample 0, so lin0 columns avoid 0). A column of
# lin1 reads a ReLU output, so lin1 columns are units active on every sample (checked against PEFT's models built
# with torch.manual_seed(0), as MockTransformerWrapper does): MLP / MLP2 lin0 rows 6, 7, 11, 13, 18 are active on all
# 9 samples, Conv2d2's flattened conv output is active at 0..8, 31 among others, Conv2dGroups' at 6, 13, 14 (both of
# its two rows), EmbConv1D's flattened ReLU at 1, 2, 4, 7 on most samples and Conv2d's at 1, 5, 7, 8. A weight entry
# in a selected row and a selected column belongs to the row: where a layer has both, its column delta covers the
# other rows, which include active ones.
_COLUMNS = {"lin0": [2, 5, 9], "lin1": [6, 13]}
_ROWS_AND_COLUMNS = {"neurons": {"lin0": [0, 3, 7], "lin1": [0]}, "columns": {"lin0": [2, 5], "lin1": [6, 13]}}
# Language-routed columns, as _ROUTED for rows: without `neuron_groups` only the agnostic columns get gradient, and
# every layer keeps agnostic columns so that each column delta tensor still trains.
_ROUTED_COLUMNS = {
    "columns": {"lin0": [1, 2], "lin1": [6]},
    "language_columns": {"fr": {"lin0": [5, 6], "lin1": [13]}, "de": {"lin0": [8]}},
}
# Routed rows and routed columns in one adapter; lin1 (2 outputs) trains columns only: with _ROUTED's rows 0 and 1
# every row of lin1 would be selected and its columns would add no parameter (refused).
_ROUTED_ROWS_AND_COLUMNS = {
    "neurons": {"lin0": [0, 1, 2]},
    "language_neurons": {"fr": {"lin0": [5, 6]}, "de": {"lin0": [10]}},
    **_ROUTED_COLUMNS,
}

# (test name, model id, config class, config kwargs) -- the format of PEFT's TEST_CASES.
#
# lin0 of MLP / MLP2 / MLP_LayerNorm / Conv2d2 feeds a ReLU, and PEFT's inputs are fixed (arange(90).view(9, 10)).
# Rows of lin0 whose pre-activation is negative have no effect on the output and get no gradient, so a case whose
# lin0 rows are all inactive makes PEFT's checks fail for a reason that is not NeuronSelect's: test_safe_merge
# compares sample 0 only and needs the adapter to change it, test_only_params_are_updated needs every delta tensor to
# move. With 10% of MLP's lin0 (rows 14 and 17 by magnitude) both rows are off on sample 0, and on MLP_LayerNorm on
# every sample (adapter output checked against a dense W0 + delta reference: identical). Cases on lin0 therefore
# use 25% of the rows or random rows, which include active ones; the all-defaults config is covered by MLP 3, MLP2
# 1 and the convolution models.
NEURON_SELECT_TEST_CASES = [
    # live-row update path (the default), rows picked by weight-row magnitude unless said otherwise
    ("Vanilla MLP 1 NeuronSelect", "MLP", NeuronSelectConfig, {"target_modules": "lin0", "neuron_ratio": 0.25}),
    ("Vanilla MLP 2 NeuronSelect", "MLP", NeuronSelectConfig, {"target_modules": ["lin0"], "neuron_init": "random"}),
    ("Vanilla MLP 3 NeuronSelect", "MLP", NeuronSelectConfig, {"target_modules": ["lin1"]}),  # all defaults
    (
        "Vanilla MLP 4 NeuronSelect",
        "MLP",
        NeuronSelectConfig,
        {"target_modules": ["lin0", "lin1"], "neuron_ratio": 0.25},
    ),
    (
        "Vanilla MLP 5 NeuronSelect modules_to_save",
        "MLP",
        NeuronSelectConfig,
        {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "neuron_ratio": 0.25},
    ),
    (
        "Vanilla MLP 6 NeuronSelect random rows",
        "MLP",
        NeuronSelectConfig,
        {"target_modules": ["lin0", "lin1"], "neuron_init": "random", "seed": 3, "neuron_ratio": 0.3},
    ),
    (
        "Vanilla MLP 7 NeuronSelect no bias",
        "MLP",
        NeuronSelectConfig,
        {"target_modules": ["lin0", "lin1"], "train_bias": False, "neuron_ratio": 0.25},
    ),
    # update_path="additive": out[..., rows] += x @ delta^T on top of the untouched base layer
    (
        "Vanilla MLP 8 NeuronSelect additive",
        "MLP",
        NeuronSelectConfig,
        {"target_modules": ["lin0", "lin1"], "update_path": "additive", "neuron_ratio": 0.25},
    ),
    # every row selected: the dense W0 + delta path (no index gathers)
    (
        "Vanilla MLP 9 NeuronSelect all rows",
        "MLP",
        NeuronSelectConfig,
        {"target_modules": ["lin0", "lin1"], "neuron_ratio": 1.0},
    ),
    # explicit rows, including the first and the last row of lin0
    (
        "Vanilla MLP 10 NeuronSelect explicit rows",
        "MLP",
        NeuronSelectConfig,
        {"target_modules": ["lin0", "lin1"], "neurons": {"lin0": [0, 3, 7, 19], "lin1": [1]}},
    ),
    ("Vanilla MLP 11 NeuronSelect routed", "MLP", NeuronSelectConfig, {"target_modules": ["lin0", "lin1"], **_ROUTED}),
    (
        "Vanilla MLP 12 NeuronSelect routed additive",
        "MLP",
        NeuronSelectConfig,
        {"target_modules": ["lin0", "lin1"], "update_path": "additive", **_ROUTED},
    ),
    ("MLP2 1 NeuronSelect", "MLP2", NeuronSelectConfig, {"target_modules": ["lin0", "lin1"]}),
    (
        "MLP2 2 NeuronSelect additive",
        "MLP2",
        NeuronSelectConfig,
        {"target_modules": ["lin0", "lin1"], "update_path": "additive"},
    ),
    (
        "MLP_LayerNorm 1 NeuronSelect",
        "MLP_LayerNorm",
        NeuronSelectConfig,
        {"target_modules": ["lin0", "lin1"], "neuron_ratio": 0.25},
    ),
    (
        "MLP_LayerNorm 2 NeuronSelect modules_to_save layernorm",
        "MLP_LayerNorm",
        NeuronSelectConfig,
        {"target_modules": ["lin0"], "modules_to_save": ["layernorm0"], "neuron_ratio": 0.5},
    ),
    # transformers Conv1D stores its weight as (in, out): fan_in_fan_out
    (
        "Embedding + transformers Conv1D 1 NeuronSelect",
        "EmbConv1D",
        NeuronSelectConfig,
        {"target_modules": ["conv1d"], "fan_in_fan_out": True},
    ),
    (
        "Embedding + transformers Conv1D 2 NeuronSelect",
        "EmbConv1D",
        NeuronSelectConfig,
        {"target_modules": ["conv1d", "lin0"], "fan_in_fan_out": True, "neuron_ratio": 0.5},
    ),
    (
        "Embedding + transformers Conv1D 3 NeuronSelect additive",
        "EmbConv1D",
        NeuronSelectConfig,
        {"target_modules": ["conv1d", "lin0"], "fan_in_fan_out": True, "update_path": "additive"},
    ),
    # the Linear layers of the convolution models
    ("Conv1d 1 NeuronSelect", "Conv1d", NeuronSelectConfig, {"target_modules": ["lin0"]}),
    ("Conv2d 1 NeuronSelect", "Conv2d", NeuronSelectConfig, {"target_modules": ["lin0"]}),
    ("Conv2d1x1 1 NeuronSelect", "Conv2d1x1", NeuronSelectConfig, {"target_modules": ["lin0"], "neuron_ratio": 0.5}),
    ("Conv2d2 1 NeuronSelect", "Conv2d2", NeuronSelectConfig, {"target_modules": ["lin0", "lin1"]}),
    (
        "Conv2d2 2 NeuronSelect explicit rows additive",
        "Conv2d2",
        NeuronSelectConfig,
        {"target_modules": ["lin0", "lin1"], "neurons": {"lin0": [1, 39], "lin1": [0]}, "update_path": "additive"},
    ),
    ("Conv2dGroups 1 NeuronSelect", "Conv2dGroups", NeuronSelectConfig, {"target_modules": ["lin0", "lin1"]}),
    # input columns: alone, beside rows on the same layer, routed by language; live (auto) and additive paths
    (
        "Vanilla MLP 13 NeuronSelect columns",
        "MLP",
        NeuronSelectConfig,
        {"target_modules": ["lin0", "lin1"], "columns": _COLUMNS},
    ),
    (
        "Vanilla MLP 14 NeuronSelect columns additive",
        "MLP",
        NeuronSelectConfig,
        {"target_modules": ["lin0", "lin1"], "columns": _COLUMNS, "update_path": "additive"},
    ),
    (
        "Vanilla MLP 15 NeuronSelect rows and columns",
        "MLP",
        NeuronSelectConfig,
        {"target_modules": ["lin0", "lin1"], **_ROWS_AND_COLUMNS},
    ),
    (
        "Vanilla MLP 16 NeuronSelect rows and columns additive",
        "MLP",
        NeuronSelectConfig,
        {"target_modules": ["lin0", "lin1"], "update_path": "additive", **_ROWS_AND_COLUMNS},
    ),
    (
        "Vanilla MLP 17 NeuronSelect routed columns",
        "MLP",
        NeuronSelectConfig,
        {"target_modules": ["lin0", "lin1"], **_ROUTED_COLUMNS},
    ),
    # seed 1: PEFT's test_save_load_roundtrip_fsdp_wrapped compares the FSDP-wrapped forward (additive path: FSDP's
    # hooks make the live swap unsafe) with the plain one (live path) at allclose's default rtol=1e-5. The two paths
    # round differently (x @ W0 + x @ delta vs x @ (W0 + delta)); with seed 0's deltas sample 2's log-softmax output
    # of -7.0443e-3 (log(1 - p), p = 0.993: the cancellation amplifies logit rounding) came out as -7.04436e-3 live
    # and -7.04424e-3 additive, each within 9e-6 relative of a float64 dense W0 + rows + columns reference (-7.04430e-3)
    # but 1.7e-5 apart. Seed 1's largest relative gap is 3.5e-7.
    (
        "Vanilla MLP 18 NeuronSelect routed rows and columns",
        "MLP",
        NeuronSelectConfig,
        {"target_modules": ["lin0", "lin1"], "seed": 1, **_ROUTED_ROWS_AND_COLUMNS},
    ),
    (
        "Vanilla MLP 19 NeuronSelect routed rows and columns additive",
        "MLP",
        NeuronSelectConfig,
        {"target_modules": ["lin0", "lin1"], "update_path": "additive", **_ROUTED_ROWS_AND_COLUMNS},
    ),
    (
        "Vanilla MLP 20 NeuronSelect rows and columns no bias",
        "MLP",
        NeuronSelectConfig,
        {"target_modules": ["lin0", "lin1"], "train_bias": False, **_ROWS_AND_COLUMNS},
    ),
    # lin0 keeps the neuron_ratio pick of rows (no explicit units), lin1 trains columns only
    (
        "MLP2 3 NeuronSelect columns",
        "MLP2",
        NeuronSelectConfig,
        {"target_modules": ["lin0", "lin1"], "columns": {"lin1": [6, 20, 31]}},
    ),
    (
        "MLP_LayerNorm 3 NeuronSelect rows and columns",
        "MLP_LayerNorm",
        NeuronSelectConfig,
        {
            "target_modules": ["lin0", "lin1"],
            "neurons": {"lin0": [0, 3]},
            "columns": {"lin0": [1, 4, 8], "lin1": [0, 6]},
        },
    ),
    # Conv1D (fan-in-fan-out, one output row): columns only; lin0 rows and columns
    (
        "Embedding + transformers Conv1D 4 NeuronSelect columns",
        "EmbConv1D",
        NeuronSelectConfig,
        {
            "target_modules": ["conv1d", "lin0"],
            "fan_in_fan_out": True,
            "neurons": {"lin0": [0]},
            "columns": {"conv1d": [0, 2, 4], "lin0": [1, 7]},
        },
    ),  # fmt: skip
    (
        "Embedding + transformers Conv1D 5 NeuronSelect columns additive",
        "EmbConv1D",
        NeuronSelectConfig,
        {
            "target_modules": ["conv1d", "lin0"],
            "fan_in_fan_out": True,
            "update_path": "additive",
            "columns": {"conv1d": [0, 2, 4], "lin0": [1, 7]},
        },
    ),  # fmt: skip
    (
        "Conv2d 2 NeuronSelect columns",
        "Conv2d",
        NeuronSelectConfig,
        {"target_modules": ["lin0"], "columns": {"lin0": [1, 5]}},
    ),
    (
        "Conv2d2 3 NeuronSelect rows and columns",
        "Conv2d2",
        NeuronSelectConfig,
        {
            "target_modules": ["lin0", "lin1"],
            "neurons": {"lin0": [1, 39]},
            "columns": {"lin0": [3, 7], "lin1": [0, 5, 31]},
        },
    ),
    # lin0 of Conv2dGroups gets an unbatched 1-D input (X.flatten()): columns of a 1-D call, plain and routed
    (
        "Conv2dGroups 2 NeuronSelect columns",
        "Conv2dGroups",
        NeuronSelectConfig,
        {"target_modules": ["lin0", "lin1"], "columns": {"lin0": [1, 45, 89], "lin1": [6, 13, 14]}},
    ),
    (
        "Conv2dGroups 3 NeuronSelect routed columns additive",
        "Conv2dGroups",
        NeuronSelectConfig,
        {
            "target_modules": ["lin0", "lin1"],
            "update_path": "additive",
            "columns": {"lin0": [1, 45], "lin1": [6]},
            "language_columns": {"fr": {"lin0": [89], "lin1": [13]}},
        },
    ),  # fmt: skip
]

# (test name, tuner method, config class, kwargs of adapter 1, kwargs of adapter 2), on PEFT's MLP.
NEURON_SELECT_MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES = [
    (
        "NeuronSelect Same",
        "neuron_select",
        NeuronSelectConfig,
        {"target_modules": ["lin0"], "init_weights": False, "neuron_ratio": 0.5},
        {"target_modules": ["lin0"], "init_weights": False, "neuron_ratio": 0.5, "seed": 1},
    ),
    (
        "NeuronSelect Different",
        "neuron_select",
        NeuronSelectConfig,
        {"target_modules": ["lin0"], "init_weights": False, "neuron_ratio": 0.5},
        {"target_modules": ["lin1"], "init_weights": False, "neuron_ratio": 1.0},
    ),
    (
        "NeuronSelect columns Same",
        "neuron_select",
        NeuronSelectConfig,
        {"target_modules": ["lin0"], "init_weights": False, "columns": {"lin0": [2, 5, 9]}},
        {
            "target_modules": ["lin0"],
            "init_weights": False,
            "columns": {"lin0": [5, 9]},
            "neurons": {"lin0": [0, 7]},
            "seed": 1,
        },
    ),  # fmt: skip
    (
        "NeuronSelect columns Different",
        "neuron_select",
        NeuronSelectConfig,
        {"target_modules": ["lin0"], "init_weights": False, "columns": {"lin0": [2, 5, 9]}},
        {"target_modules": ["lin1"], "init_weights": False, "neurons": {"lin1": [0]}, "columns": {"lin1": [6, 13]}},
    ),
]

# PEFT tests that do not apply to NeuronSelect, with the reason; the suite's conftest skips exactly these (for
# NeuronSelect items only) with this reason, and the runner prints them. Keyed by PEFT's test function name.
NOT_APPLICABLE: dict[str, str] = {
    # PEFT >= 0.22 checks that an adapter on ModelConv2D's conv2d layer changes that convolution's output under
    # each padding mode. NeuronSelect adapts Linear layers only, so its Conv2d cases target lin0 and the
    # convolution is the base model's own, with no adapter to test.
    "test_conv2d_padding": "it adapts Linear layers only, and this test checks an adapter on the Conv2d layer itself",
}

# Every skip of a NeuronSelect item must contain one of these (the runner fails on any other skip, so nothing is
# skipped silently). The first four are PEFT's own per-method skips, reviewed:
EXPECTED_SKIP_REASONS: tuple[str, ...] = (
    # PEFT passes `bias="all"` to the config and skips methods whose config has no `bias` option. NeuronSelect's
    # `train_bias` trains only the bias entries of selected rows; there is no "train every bias" mode to test.
    "does not support the 'bias' argument",
    "requires the PEFT method to support training the bias directly",
    # PEFT checks its LoRA/BOFT-specific bias warning only for those methods.
    "Testing bias warnings only for LoraConfig or BOFTConfig",
    # PEFT's generic rule for cases with modules_to_save (one trainable copy cannot serve two active adapters).
    "Multiple active adapters with modules_to_save/trainable_token_indices is not supported",
    # PEFT >= 0.22, reviewed. LoRA conversion: an adapter that trains bias entries cannot become a LoRA (which has
    # no bias), so its layers report supports_lora_conversion() False and PEFT skips; the cases without bias
    # entries run the conversion tests (and tests/tuner/test_lora_conversion.py checks the converted LoRA).
    "does not support LoRA conversion",
    # tests that PEFT runs only on its MLP model (unknown layer types, row-independent batching)
    "Running this test only for MLP",
    "This test is only for PEFT methods targeting MLP",
    "Only the MLP models process each row of the input independently",
    # ours, from NOT_APPLICABLE above
    "not applicable to NeuronSelect",
)
