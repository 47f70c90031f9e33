"""Statistics of the reports: bootstrap intervals and paired differences over test sentences, t intervals over seeds.

* Corpus BLEU/chrF (quality.py): `significance` gives every method's 95% bootstrap interval and, for the pairs it is
  asked about, the paired difference ``system - baseline`` with its interval and a one-sided p. Resampling is
  stratified by language and every method is resampled with the same indices (`resample_indices`), so differences
  are paired; scores come from sacrebleu's sufficient statistics (`bootstrap_scores`). Why not sacrebleu's own
  paired test: see the comment above `BOOTSTRAP_SAMPLES`.
* Teacher-forced NLL (selection_value.py): per sentence ``[summed NLL, target tokens]``; `macro_nll` is the mean
  over languages of the token-weighted NLL; `paired_bootstrap` the difference of two systems with a 95% interval
  (stratified by language, fixed seed); `seed_interval` mean +- t(0.975, n-1) x sd / sqrt(n) over seeds.
"""

from __future__ import annotations

import math

# ------------------------------------------------------------------------------------------------ teacher-forced NLL
# Why not sacrebleu's own paired test (sacrebleu.significance.PairedTest, `sacrebleu --paired-bs`): it scores one
# corpus with one metric configuration, so it cannot express what quality.py reports, the mean over target
# languages of per-language corpus scores, each language with its own BLEU tokenizer (character-level for zh/ja/ko).
# Resampling is therefore stratified by language here, and everything else is sacrebleu's: the sufficient statistics
# and the score computed from summed statistics (its private _extract_corpus_statistics /
# _compute_score_from_stats, as PairedTest uses them) and its resampling (numpy default_rng(12345) indices, as
# SACREBLEU_SEED's default). With one language the resampled scores are exactly PairedTest's;
# tests/benchmark_smoke/test_quality_smoke.py checks that through sacrebleu's own mean and 95% half-width. The
# reported statistics differ on purpose: percentile intervals of the language-averaged score and of paired
# differences, and a one-sided p (share of resamples in which the system is not better), where sacrebleu reports
# mean +- half-width and a two-sided p.
BOOTSTRAP_SAMPLES = 1000


def _metric(name: str, tgt_lang: str):
    import sacrebleu

    from neuron_peft.evaluation import _SACREBLEU_TOKENIZE

    if name == "bleu":
        return sacrebleu.metrics.BLEU(tokenize=_SACREBLEU_TOKENIZE.get(tgt_lang, "13a"))
    return sacrebleu.metrics.CHRF()


def bootstrap_scores(evaluation: dict, metric: str, seeds: dict):
    """Language-averaged corpus score on each bootstrap resample: ``[n_samples]``.

    Resampling is stratified by language (each language's sentences are drawn with replacement from that language
    only), because the reported number is the mean of per-language corpus scores. ``seeds`` maps a group to its
    resample indices, so two systems resampled with the same ``seeds`` form a *paired* bootstrap. Scores come from
    sacrebleu's sufficient statistics, summed per resample, exactly as its own ``--paired-bs`` test does.
    """
    import numpy as np

    per_lang = []
    for group, s in evaluation["per_group"].items():
        if "hyps" not in s:
            raise ValueError(f"{group}: no hypotheses stored (results written before the significance test?)")
        m = _metric(metric, s.get("tgt_lang", group.split("-")[-1]))
        stats = np.asarray(m._extract_corpus_statistics(s["hyps"], [s["refs"]]), dtype=np.float64)
        idx = seeds[group]
        per_lang.append(np.array([m._compute_score_from_stats(stats[i].sum(0)).score for i in idx]))
    return np.mean(per_lang, axis=0)


def resample_indices(evaluation: dict, n_samples: int = BOOTSTRAP_SAMPLES, seed: int = 12345) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    return {g: rng.integers(0, s["n"], size=(n_samples, s["n"])) for g, s in sorted(evaluation["per_group"].items())}


def significance(
    results: dict,
    pairs: list[tuple[str, str]],
    split: str = "test",
    n_samples: int = BOOTSTRAP_SAMPLES,
    seed: int = 12345,
) -> dict:
    """95% bootstrap intervals per method and paired differences ``system - baseline`` (BLEU and chrF).

    ``p`` is the one-sided paired-bootstrap probability that the system is *not* better than the baseline: the
    fraction of resamples in which its language-averaged score is <= the baseline's. Every method is resampled
    with the same indices, so all intervals and differences are paired.
    """
    import numpy as np

    m = results["methods"]
    pairs = [(a, b) for a, b in pairs if a != b and a in m and b in m and split in m[a] and split in m[b]]
    names = [n for n in m if split in m[n]]
    if not names:
        return {}
    seeds = resample_indices(m[names[0]][split], n_samples, seed)
    boot = {(n, k): bootstrap_scores(m[n][split], k, seeds) for n in names for k in ("bleu", "chrf")}
    out: dict = {"n_samples": n_samples, "seed": seed, "split": split, "ci": {}, "paired": []}
    for n in names:
        out["ci"][n] = {k: [float(np.percentile(boot[n, k], 2.5)), float(np.percentile(boot[n, k], 97.5))]
                        for k in ("bleu", "chrf")}  # fmt: skip
    for a, b in pairs:
        row = {"system": a, "baseline": b}
        for k in ("bleu", "chrf"):
            d = boot[a, k] - boot[b, k]
            row[k] = {"delta": m[a][split][k] - m[b][split][k],
                      "ci": [float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))],
                      "p": float((d <= 0).mean())}  # fmt: skip
        out["paired"].append(row)
    return out


# --------------------------------------------------------------------------------------------------- teacher-forced NLL
# t(0.975, df) for the seed intervals (df = seeds - 1); 1.96 beyond df 10
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def macro_nll(per: list[list[float]], groups: list[str]) -> float:
    """Mean over languages of the token-weighted NLL per target token within the language."""
    acc: dict[str, list[float]] = {}
    for (s, c), g in zip(per, groups):
        a = acc.setdefault(g, [0.0, 0.0])
        a[0] += s
        a[1] += c
    return sum(s / c for s, c in acc.values()) / len(acc)


def per_lang_nll(per, groups) -> dict[str, float]:
    acc: dict[str, list[float]] = {}
    for (s, c), g in zip(per, groups):
        a = acc.setdefault(g, [0.0, 0.0])
        a[0] += s
        a[1] += c
    return {g: s / c for g, (s, c) in acc.items()}


def paired_bootstrap(a: list, b: list, groups: list[str], n_samples: int = 1000, seed: int = 12345) -> dict:
    """Difference ``macro_nll(a) - macro_nll(b)`` with a 95% interval: resample sentences within each language
    (the same resamples for every comparison: fixed seed), recompute both macro NLLs, take the difference."""
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    langs = sorted(set(groups))
    members = {g: np.array([i for i, x in enumerate(groups) if x == g]) for g in langs}
    diffs = np.zeros(n_samples)
    for g in langs:
        idx = members[g][rng.integers(0, len(members[g]), size=(n_samples, len(members[g])))]
        da = a[idx, 0].sum(1) / a[idx, 1].sum(1)
        db = b[idx, 0].sum(1) / b[idx, 1].sum(1)
        diffs += (da - db) / len(langs)
    delta = macro_nll(a.tolist(), groups) - macro_nll(b.tolist(), groups)
    return {"delta": float(delta), "ci": [float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))],
            "p_not_lower": float((diffs >= 0).mean())}  # fmt: skip


def seed_interval(values: list[float]) -> list[float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return [mean, float("nan")]
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return [mean, T975.get(n - 1, 1.96) * sd / math.sqrt(n)]


def seed_mean_per_sentence(runs: list[list[list[float]]]) -> list[list[float]]:
    """Per sentence, the mean over seeds of [summed NLL, tokens] (tokens are the same in every seed)."""
    return [[sum(r[i][0] for r in runs) / len(runs), runs[0][i][1]] for i in range(len(runs[0]))]
