"""Smoke test of benchmarks/quality.py: every method's code path on a tiny random Llama with fake data (< 30 s)."""

from __future__ import annotations

import importlib
import json
import math

import pytest
from testing_utils import load_benchmark


@pytest.fixture(scope="module")
def quality():
    return load_benchmark("quality")


@pytest.fixture(scope="module")
def stats(quality):
    """benchmarks/common/stats.py (importable once the runner has put benchmarks/ on sys.path)."""
    return importlib.import_module("common.stats")


@pytest.fixture(scope="module")
def machine(quality):
    """benchmarks/common/machine.py."""
    return importlib.import_module("common.machine")


@pytest.fixture(scope="module")
def run(quality, tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    data = tmp_path_factory.mktemp("quality_data") / "data.jsonl"  # an input never sits inside --out
    exported = quality.main(["--preset", "tiny", "--export-data", str(data)], log=lambda s: None)
    lines: list[str] = []
    results = quality.main(["--preset", "tiny", "--data-file", str(data), "--out", str(out)], log=lines.append)
    return results, "\n".join(lines), out, exported, data


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_every_method_ran(quality, run):
    results, _, _, _, _ = run
    assert list(results["methods"]) == list(quality.PRESETS["tiny"].methods)
    assert set(results["methods"]) == set(quality.METHODS)
    for name, r in results["methods"].items():
        for split in ("test", "forget"):
            assert _finite(r[split]["bleu"]) and _finite(r[split]["chrf"]), name
            assert set(r[split]["per_group"]) == ({"en-fr", "en-de"} if split == "test" else {"en-sw", "en-id"})
        if name == "zero-shot":
            assert r["trainable"] == 0 and r["grid"] == []
            continue
        grid = quality.PRESETS["tiny"].grids[r["family"]]
        assert [g["lr"] for g in r["grid"]] == grid, name  # every LR of the family's grid was tried on dev
        best = max(r["grid"], key=lambda g: g["dev_chrf"])
        assert r["lr"] == best["lr"], name  # picked on dev, never on test
        assert r["trainable"] > 0 and _finite(r["train_seconds"]) and _finite(r["peak_mib"]), name
        assert len(r["losses"]) == quality.PRESETS["tiny"].steps and all(map(_finite, r["losses"])), name


def test_budgets_and_routing(run):
    """Ablations keep their promises: random/magnitude rows match ns-0.4's budget; specific + agnostic = ns-0.4."""
    m = run[0]["methods"]
    assert m["ns-0.4-random"]["trainable"] == m["ns-0.4-magnitude"]["trainable"] == m["ns-0.4"]["trainable"]
    assert m["ns-0.4-agnostic"]["trainable"] + m["ns-0.4-specific"]["trainable"] == m["ns-0.4"]["trainable"]
    assert m["ns-0.4"]["trainable"] < m["ns-0.8"]["trainable"] <= m["ns-all-layers"]["trainable"]
    assert m["lora-r8"]["trainable"] < m["lora-r16"]["trainable"] < m["dora-r16"]["trainable"]
    assert m["full"]["trainable"] > m["ns-all-layers"]["trainable"]
    assert m["ns-0.4"]["routed"] and m["ns-0.4-specific"]["routed"]
    assert not m["ns-0.4-random"]["routed"] and not m["ns-0.4-agnostic"]["routed"] and not m["lora-r16"]["routed"]


def test_outputs(quality, run):
    results, text, out, _, _ = run
    md = (out / "quality.md").read_text()
    assert "Smoke-scale result" in md and "BLEU: `" in md and "chrF: `" in md  # label and sacrebleu signatures
    table = [ln for ln in md.splitlines() if ln.startswith("| ")]
    for name in quality.METHODS:
        assert any(ln.split("|")[1].strip() == name for ln in table), f"{name} missing from the markdown"
    assert "Targets (issue 6)" in md and ("NOT MET" in md or "MET" in md)
    assert md in text  # tables go to stdout too
    assert (out / "quality_bleu.png").stat().st_size > 1000
    dumped = json.loads((out / "results.json").read_text())
    assert set(dumped["methods"]) == set(results["methods"])


def test_export_roundtrip(quality, run, tmp_path):
    _, _, _, exported, data = run
    p = quality.PRESETS["tiny"]
    assert exported["counts"]["train"] == {"en-fr": p.n_train, "en-de": p.n_train}
    back = quality.read_data(data)
    direct = quality.build_data(p)
    assert {k: [vars(e) for e in v] for k, v in back.items()} == {k: [vars(e) for e in v] for k, v in direct.items()}
    # splits never share a sentence pair
    seen = {k: {(e.src, e.tgt) for e in v} for k, v in back.items()}
    assert not (seen["train"] & seen["test"]) and not (seen["train"] & seen["dev"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"split": "train", "src": "a"}\n')
    with pytest.raises(ValueError, match="missing field"):
        quality.read_data(bad)


def test_dry_run_gpu_preset(quality):
    """The GPU preset's configuration resolves (all methods, 3-value grids, 200 test verses) without a model."""
    lines: list[str] = []
    plan = quality.main(["--preset", "gpu", "--model", "tiny", "--device", "cpu", "--dry-run"], log=lines.append)
    assert plan["dry_run"] and plan["preset"]["n_test"] == 200 and not plan["preset"]["smoke"]
    assert set(plan["preset"]["methods"]) == set(quality.METHODS)
    assert plan["runs_planned"] == sum(3 for m in quality.METHODS if m != "zero-shot")
    assert "full-scale comparison" in lines[0]


def test_peak_memory_sees_allocation(machine):
    import torch

    with machine.PeakMemory(torch.device("cpu")) as mem:
        x = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB, touched
        del x
    assert mem.peak_mib - mem.before_mib > 48 or "ru_maxrss" in mem.how


# ---------------------------------------------------------------------------------------- significance (bootstrap)
_REFS = {
    "en-fr": ["le chat est sur le tapis", "il fait beau aujourd'hui", "nous allons au marché", "la maison est grande"],
    "en-de": ["die Katze sitzt auf der Matte", "heute ist schönes Wetter", "wir gehen zum Markt", "das Haus ist groß"],
}


def _evaluation(hyps_by_group):
    per = {g: {"hyps": h, "refs": _REFS[g], "tgt_lang": g[3:], "n": len(h)} for g, h in hyps_by_group.items()}
    return {"per_group": per}


def test_bootstrap_matches_sacrebleu_on_hand_resamples(stats):
    """Each resample's score = mean over languages of sacrebleu.corpus_bleu on the resampled sentence lists."""
    import numpy as np
    import sacrebleu

    hyps = {
        "en-fr": ["le chat est sur tapis", "il fait beau", "nous allons au marché", "une maison"],
        "en-de": ["die Katze sitzt auf Matte", "heute schönes Wetter", "wir gehen Markt", "das Haus ist groß"],
    }
    ev = _evaluation(hyps)
    seeds = {
        "en-fr": np.array([[0, 1, 2, 3], [0, 0, 3, 3], [2, 2, 2, 1]]),
        "en-de": np.array([[0, 1, 2, 3], [1, 1, 1, 1], [3, 0, 3, 0]]),
    }
    for metric, score in (("bleu", sacrebleu.corpus_bleu), ("chrf", sacrebleu.corpus_chrf)):
        got = stats.bootstrap_scores(ev, metric, seeds)
        want = [
            np.mean(
                [score([hyps[g][i] for i in seeds[g][b]], [[_REFS[g][i] for i in seeds[g][b]]]).score for g in hyps]
            )
            for b in range(3)
        ]
        assert np.allclose(got, want), (metric, got, want)


def test_one_language_bootstrap_is_sacrebleus_paired_bootstrap(stats):
    """With one language there is nothing to stratify: our resampled scores for baseline and system are those of
    sacrebleu's PairedTest(test_type="bs") (same seed, same indices), checked through sacrebleu's own estimate_ci
    (mean, 95% half-width) of each system."""
    import numpy as np
    from sacrebleu.metrics import BLEU, CHRF
    from sacrebleu.significance import PairedTest, estimate_ci

    refs = ["le chat est sur le tapis", "il fait beau aujourd'hui", "nous allons au marché", "la maison est grande",
            "le chien dort", "elle lit un livre", "ils mangent du pain", "la voiture est rouge"]  # fmt: skip
    base = ["le chat sur le tapis", "il fait beau", "nous allons marché", "une maison", "le chien", "elle lit",
            "ils mangent", "voiture rouge"]  # fmt: skip
    system = ["le chat est sur tapis", "il fait beau aujourd'hui", "nous allons au marché", "la maison grande",
              "le chien dort", "elle lit un livre", "ils mangent pain", "la voiture est rouge"]  # fmt: skip
    ev = {n: {"per_group": {"en-fr": {"hyps": h, "refs": refs, "tgt_lang": "fr", "n": len(h)}}}
          for n, h in (("base", base), ("system", system))}  # fmt: skip
    seeds = stats.resample_indices(ev["base"], n_samples=300, seed=12345)
    for metric, sb in (("bleu", BLEU()), ("chrf", CHRF())):
        _, scores = PairedTest([("base", base), ("system", system)], {metric: sb}, [refs], "bs", n_samples=300)()
        (res_base, res_system) = next(v for k, v in scores.items() if k != "System")
        for name, res in (("base", res_base), ("system", res_system)):
            mean, half = estimate_ci(stats.bootstrap_scores(ev[name], metric, seeds))
            assert np.isclose(mean, res.mean) and np.isclose(half, res.ci), (metric, name, mean, res.mean)


def test_paired_bootstrap_detects_a_real_gap_and_not_a_fake_one(stats):
    good = _evaluation({g: list(r) for g, r in _REFS.items()})  # perfect translations
    bad = _evaluation({g: ["x y z"] * 4 for g in _REFS})
    results = {
        "methods": {
            n: {"test": {**e, "bleu": 0.0, "chrf": 0.0}}
            for n, e in (("good", good), ("bad", bad), ("same", _evaluation({g: list(r) for g, r in _REFS.items()})))
        }
    }
    sig = stats.significance(results, [("good", "bad"), ("good", "same"), ("bad", "good")], n_samples=200)
    rows = {(r["system"], r["baseline"]): r for r in sig["paired"]}
    assert rows["good", "bad"]["bleu"]["p"] == 0.0 and rows["good", "bad"]["bleu"]["ci"][0] > 90
    assert rows["bad", "good"]["bleu"]["p"] == 1.0
    assert rows["good", "same"]["bleu"]["ci"] == [0.0, 0.0] and rows["good", "same"]["bleu"]["p"] == 1.0
    assert sig["ci"]["good"]["bleu"] == pytest.approx([100.0, 100.0])


def test_significance_in_the_report(quality, run):
    results, _, out, _, _ = run
    md = (out / "quality.md").read_text()
    assert "paired bootstrap" in md and "| ns-0.4 − lora-r16 |" in md
    sig = results["significance"]["test"]
    assert {(r["system"], r["baseline"]) for r in sig["paired"]} >= {("ns-0.4", "lora-r16"), ("ns-0.4", "full")}
    for r in sig["paired"]:
        lo, hi = r["bleu"]["ci"]
        assert lo <= hi and 0.0 <= r["bleu"]["p"] <= 1.0
    assert set(results["significance"]["forget"]["ci"]) == set(results["methods"])


def test_report_rebuilds_from_partial_results(quality, run, tmp_path):
    """--report turns the results.json of an interrupted run into a full report (significance, targets, plot)."""
    results, _, out, _, _ = run
    saved = json.loads((out / "results.json").read_text())
    for key in ("significance", "targets", "total_seconds"):
        saved.pop(key)
    del saved["methods"]["ns-0.4-magnitude"]  # the run stopped before its last method
    (tmp_path / "results.json").write_text(json.dumps(saved))
    lines: list[str] = []
    rebuilt = quality.main(["--report", str(tmp_path / "results.json")], log=lines.append)
    assert "partial results: 11 of 12 methods" in lines[0]
    md = (tmp_path / "quality.md").read_text()
    assert "| ns-0.4 − lora-r16 |" in md and "ns-0.4-magnitude" not in md
    assert rebuilt["significance"]["test"]["paired"] and (tmp_path / "quality_bleu.png").exists()
    same = {(r["system"], r["baseline"]): r["bleu"]["ci"] for r in rebuilt["significance"]["test"]["paired"]}
    full = {(r["system"], r["baseline"]): r["bleu"]["ci"] for r in results["significance"]["test"]["paired"]}
    assert all(same[k] == full[k] for k in same)  # same resamples, same intervals


def test_interleaved_step_timing_smoke():
    module = load_benchmark("interleaved_steps")
    lines: list[str] = []
    out = module.main(
        ["--preset", "tiny", "--methods", "lora-r16,ns-0.4,ns-0.4-random", "--steps", "2"], log=lines.append
    )
    assert {m: len(t) for m, t in out["times"].items()} == {"lora-r16": 2, "ns-0.4": 2, "ns-0.4-random": 2}
    assert out["summary"]["lora-r16"]["ratio"] == 1.0 and all(_finite(s["ratio"]) for s in out["summary"].values())
    assert any(line.startswith("| ns-0.4 |") for line in lines)
    with pytest.raises(SystemExit):
        module.main(["--preset", "tiny", "--methods", "zero-shot,ns-0.4"], log=lines.append)


def test_selection_ratios_from_the_command_line(quality):
    plan = quality.main(["--preset", "cpu-large", "--model", "tiny", "--neuron-ratio", "0.1", "--specific-ratio", "0.2",
                         "--methods", "ns-0.4,ns-0.4-random", "--dry-run"], log=lambda s: None)  # fmt: skip
    assert plan["preset"]["neuron_ratio"] == 0.1 and plan["preset"]["specific_ratio"] == 0.2
    assert plan["preset"]["methods"] == ("zero-shot", "ns-0.4", "ns-0.4-random")
