"""Scale-free ranking options of `select_neurons` / `NeuronSelection.decide`, checked against hand-computed picks on
hand-built score tables (module-type normalisation, per-layer and global row selection, group normalisation), plus
the token-reduction relation and option validation on a tiny Llama."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import neuron_peft  # noqa: F401  (registers the PEFT method)
from neuron_peft.selection import NeuronSelection, module_type, select_neurons

Q0, D0 = "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"
Q1, D1 = "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"
LAYERS = [Q0, D0, Q1, D1]
# q_proj scores are 10-100x smaller than down_proj's, as raw Taylor means of different projection types are
SCORES = {
    Q0: [0.1, 0.2, 0.3, 0.4],
    D0: [1.0, 0.9, 1.1, 0.8],
    Q1: [0.01, 0.02, 0.03, 0.04],
    D1: [2.0, 2.1, 1.9, 2.2],
}
IN_FEATURES = [8, 16, 8, 16]  # q_proj rows hold 8 weights, down_proj rows 16: 192 weights in all


def hand_selection(**options) -> NeuronSelection:
    """One group, four layers of four rows; the layer score is the layer's mean neuron score (as Taylor's)."""
    scores = {n: torch.tensor([v]) for n, v in SCORES.items()}
    layer_scores = torch.tensor([[sum(SCORES[n]) / 4] for n in LAYERS])
    options.setdefault("layer_ratio", {"language": 0.5})
    options.setdefault("specific_ratio", 0.0)
    sel = NeuronSelection(
        groups=["en-fr"], layers=list(LAYERS), parts=["language"] * 4, out_features=[4] * 4,
        neuron_scores=scores, layer_scores=layer_scores, in_features=list(IN_FEATURES), **options,
    )  # fmt: skip
    sel.decide()
    return sel


def rows(sel: NeuronSelection) -> dict[str, list[int]]:
    return {n: sorted(r) for n, r in sel.neurons.items()}


def test_module_type_names():
    assert module_type(Q0) == "language:q_proj"
    assert module_type("vision_tower.encoder.layers.3.mlp.fc1") == "vision:fc1"


def test_raw_layer_ranking_never_keeps_q_proj():
    sel = hand_selection(neuron_ratio=0.5)
    assert sel.kept_layers == [D0, D1]  # the two largest raw means are both down_proj


@pytest.mark.parametrize("how", ["module_type_rank", "module_type_z"])
def test_module_type_normalisation_keeps_the_best_layer_of_each_type(how):
    # within q_proj, Q0 (mean 0.25) beats Q1 (0.025); within down_proj, D1 (2.05) beats D0 (0.95): both normalise to
    # the same top value (rank 1, or z = +1), and the tie is broken by layer order
    sel = hand_selection(neuron_ratio=0.5, score_normalization=how)
    assert sel.kept_layers == [Q0, D1]
    assert rows(sel) == {Q0: [2, 3], D1: [1, 3]}  # inside a layer, the top rows by score, as without normalisation
    expected = [1.0, 0.0, 0.0, 1.0] if how == "module_type_rank" else [1.0, -1.0, -1.0, 1.0]
    assert sel.layer_ranking().tolist() == pytest.approx(expected)
    assert sel.layer_importance().tolist() == pytest.approx([0.25, 0.95, 0.025, 2.05])  # raw, unchanged


def test_per_layer_takes_the_same_share_of_every_layer():
    sel = hand_selection(row_selection="per_layer", weight_ratio=0.5)
    assert rows(sel) == {Q0: [2, 3], D0: [0, 2], Q1: [2, 3], D1: [1, 3]}
    assert sel.trained_weights() == 2 * 8 + 2 * 16 + 2 * 8 + 2 * 16  # half of the 192 weights


def test_global_raw_scores_spend_the_budget_on_down_proj_only():
    # budget 0.25 * 192 = 48 weights = three 16-weight down_proj rows: D1's 2.2, 2.1, 2.0
    sel = hand_selection(row_selection="global", weight_ratio=0.25)
    assert rows(sel) == {D1: [0, 1, 3]}
    assert sel.trained_weights() == 48


def test_global_rank_normalised_picks_q_proj_rows_raw_scores_never_would():
    # rank percentiles within type (8 rows each): q0 rows 3,2,1 -> 7/7, 6/7, 5/7; d1 rows 3,1,0 -> 7/7, 6/7, 5/7.
    # Descending with ties by layer order: q0r3 (8), d1r3 (24), q0r2 (32), d1r1 (48); q0r1 would make 56 > 48.
    sel = hand_selection(row_selection="global", weight_ratio=0.25, score_normalization="module_type_rank")
    assert rows(sel) == {Q0: [2, 3], D1: [1, 3]}
    assert sel.kept_layers == [Q0, D1]
    assert sel.trained_weights() == 48


def test_global_budget_defaults_to_layer_ratio_times_neuron_ratio():
    a = hand_selection(row_selection="global", layer_ratio={"language": 0.5}, neuron_ratio=0.5)
    b = hand_selection(row_selection="global", weight_ratio=0.25)
    assert rows(a) == rows(b)


def test_group_normalisation_changes_which_rows_are_important():
    # group a has 45x larger scores than b. Normalised by group mean (a: 180, b: 4):
    #   a -> [2.22, 1.67, 0.06, 0.06], b -> [0.25, 0.25, 1.5, 2.0]; mean [1.24, 0.96, 0.78, 1.03] -> rows 0 and 3.
    # Raw: mean [200.5, 150.5, 8, 9] -> rows 0 and 1 (group a decides alone).
    def sel(how):
        s = NeuronSelection(
            groups=["a", "b"], layers=[Q0], parts=["language"], out_features=[4],
            neuron_scores={Q0: torch.tensor([[400.0, 300.0, 10.0, 10.0], [1.0, 1.0, 6.0, 8.0]])},
            layer_scores=torch.ones(1, 2), layer_ratio={"language": 1.0}, neuron_ratio=0.5, specific_ratio=0.0,
            in_features=[8], group_normalization=how,
        )  # fmt: skip
        s.decide()
        return rows(s)

    assert sel("mean") == {Q0: [0, 3]}
    assert sel("none") == {Q0: [0, 1]}


# ---------------------------------------------------------------------------------------------------- real scoring
def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return LlamaForCausalLM(cfg)


def batch(seed, seq=10, prompt=4):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (2, seq), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def calibration():
    return {"fr": [batch(0), batch(1)], "de": [batch(2)]}


def test_token_sum_is_mean_times_counted_tokens_and_ranks_the_same():
    model = tiny_llama()
    mean = select_neurons(model, calibration(), neuron_ratio=0.5, specific_ratio=0.2, progress=False)
    summed = select_neurons(model, calibration(), neuron_ratio=0.5, specific_ratio=0.2, token_reduction="sum",
                            progress=False)  # fmt: skip
    # every text layer counts the loss positions: labels[t+1] != -100, i.e. seq - prompt per sample, 2 samples
    assert mean.loss_tokens == {"fr": 2 * 2 * 6, "de": 2 * 6}
    for n in mean.layers:
        tokens = torch.tensor([24.0, 12.0]).unsqueeze(1)
        torch.testing.assert_close(summed.neuron_scores[n], mean.neuron_scores[n] * tokens, rtol=1e-5, atol=1e-8)
    # the group normalisation divides any per-group factor out: the same decision
    assert summed.kept_layers == mean.kept_layers and summed.neurons == mean.neurons
    assert summed.language_neurons == mean.language_neurons


def test_options_round_trip_through_save_and_load(tmp_path):
    sel = select_neurons(tiny_llama(), calibration(), row_selection="global", weight_ratio=0.1,
                         score_normalization="module_type_z", progress=False)  # fmt: skip
    total = sum(o * i for o, i in zip(sel.out_features, sel.in_features))
    assert sel.in_features[sel.layers.index("model.layers.0.mlp.down_proj")] == 64
    assert 0 < sel.trained_weights() <= 0.1 * total
    assert sel.trained_weights() > 0.1 * total - max(sel.in_features)  # filled up to within one row
    sel.save(tmp_path / "s")
    loaded = NeuronSelection.load(tmp_path / "s")
    assert (loaded.row_selection, loaded.weight_ratio, loaded.score_normalization) == ("global", 0.1, "module_type_z")
    loaded.decide()
    assert loaded.neurons == sel.neurons and loaded.language_neurons == sel.language_neurons


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"score_normalization": "zscore"}, "score_normalization must be one of"),
        ({"row_selection": "topk"}, "row_selection must be one of"),
        ({"token_reduction": "max"}, "token_reduction must be one of"),
        ({"group_normalization": "z"}, "group_normalization must be one of"),
        ({"row_selection": "layers", "weight_ratio": 0.1}, "weight_ratio sets the budget"),
        ({"row_selection": "global", "weight_ratio": 1.5}, "weight_ratio must be in"),
    ],
)
def test_bad_options_fail_clearly(kwargs, match):
    with pytest.raises(ValueError, match=match):
        select_neurons(tiny_llama(), calibration(), progress=False, **kwargs)


def test_old_selection_without_in_features_explains_itself():
    sel = hand_selection(neuron_ratio=0.5)
    sel.in_features = []
    sel.row_selection = "global"
    with pytest.raises(ValueError, match="no in_features"):
        sel.decide()


def test_default_row_selection_is_per_layer_for_taylor_and_layers_for_activation_similarity():
    """The default the selection benchmark's dev split chose: the top rows of every layer, each layer's share
    layer_ratio x neuron_ratio; hand-computed from the scores (mean over groups of each group's scores divided by
    that group's mean over all neurons), not from the selection's own ranking."""
    model = tiny_llama()
    sel = select_neurons(model, calibration(), layer_ratio=0.5, neuron_ratio=0.5, specific_ratio=0.0, progress=False)
    assert sel.row_selection == "per_layer" and sel.kept_layers == sel.layers  # every layer gets rows
    group_mean = torch.cat([sel.neuron_scores[n] for n in sel.layers], dim=1).mean(dim=1, keepdim=True)  # (G, 1)
    for n, out in zip(sel.layers, sel.out_features):
        importance = (sel.neuron_scores[n] / group_mean).mean(dim=0)
        k = round(0.25 * out)
        assert len(sel.neurons[n]) == k
        assert set(sel.neurons[n]) == set(torch.topk(importance, k).indices.tolist()), n
    reference = tiny_llama()
    neumt = select_neurons(model, calibration(), layer_scoring="activation_similarity", reference_model=reference,
                           layer_ratio=0.5, progress=False)  # fmt: skip
    assert neumt.row_selection == "layers" and len(neumt.kept_layers) == 7  # half of the 14 layers
    with pytest.raises(ValueError, match="has no layer step"):
        select_neurons(model, calibration(), layer_scoring="activation_similarity", reference_model=reference,
                       row_selection="per_layer", progress=False)  # fmt: skip
    neumt.row_selection = "global"  # re-deciding a NeuMT selection without its layer step is refused too
    with pytest.raises(ValueError, match="has no layer step"):
        neumt.decide()


def test_per_layer_gives_no_rows_to_a_layer_no_gradient_reaches():
    """A layer whose every score is 0 (its output never reaches the loss) could not learn: per_layer skips it,
    and every other layer keeps its share."""
    sel = hand_selection(row_selection="per_layer", layer_ratio={"language": 1.0}, neuron_ratio=0.5)
    assert sel.kept_layers == LAYERS
    sel.neuron_scores[Q1] = torch.zeros_like(sel.neuron_scores[Q1])
    sel.decide()
    assert sel.kept_layers == [Q0, D0, D1] and all(len(sel.neurons[n]) == 2 for n in sel.kept_layers)
