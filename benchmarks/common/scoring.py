"""A model's scores on held-out pairs: BLEU/chrF from greedy decoding, and teacher-forced NLL per sentence.

* `evaluate_translations` (quality.py): greedy translations per language group, scored by sacrebleu
  (`neuron_peft.evaluation.score_translations`), averaged over groups; every hypothesis and reference is kept, so
  stats.py can bootstrap the corpus scores later (also from a saved results.json).
* `decode_scores` (selection_value.py): chrF/BLEU of greedy translations of a few test pairs per language.
* `sentence_nll` (selection_value.py): per sentence ``[summed NLL over its target tokens, number of target
  tokens]`` under teacher forcing, on an `EvalSet` (the split pre-collated once into length-sorted batches, so
  every method is scored on the same tensors). `english_features` turns plain English verses into such examples
  (loss on every token) for the forgetting probe.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from neuron_peft.data import IGNORE_INDEX, TranslationCollator
from neuron_peft.evaluation import score_translations, translate

from .data import by_group

if TYPE_CHECKING:
    from .preset import Preset


def evaluate_translations(model, tok, examples, p: Preset, shots: Optional[dict] = None) -> dict:
    """Per-group BLEU/chrF (sacrebleu) plus averages; `shots` maps a group to its few-shot examples."""
    per = {}
    for group, exs in by_group(examples).items():
        hyps = translate(model, tok, exs, max_new_tokens=p.max_new_tokens, batch_size=p.eval_batch_size,
                         shots=(shots or {}).get(group, []))  # fmt: skip
        s = score_translations(hyps, [e.tgt for e in exs], tgt_lang=exs[0].tgt_lang)
        s["samples"] = [{"src": e.src, "ref": e.tgt, "hyp": h} for e, h in list(zip(exs, hyps))[:2]]
        s["hyps"], s["refs"], s["tgt_lang"] = list(hyps), [e.tgt for e in exs], exs[0].tgt_lang
        per[group] = s
    return {
        "per_group": per,
        "bleu": sum(s["bleu"] for s in per.values()) / len(per),
        "chrf": sum(s["chrf"] for s in per.values()) / len(per),
    }


def decode_scores(model, tok, examples, groups, max_new_tokens: int, batch_size: int) -> dict:
    """chrF/BLEU of greedy translations of `examples` per group (in the order of `groups`) and averaged, with the
    seconds it took (selection_value.py's decoded columns); {} when there is nothing to decode."""
    if not examples:
        return {}
    t = time.perf_counter()
    hyps = translate(model, tok, examples, max_new_tokens=max_new_tokens, batch_size=batch_size)
    per = {}
    for g in groups:
        hs = [h for h, e in zip(hyps, examples) if e.group == g]
        rs = [e.tgt for e in examples if e.group == g]
        s = score_translations(hs, rs, tgt_lang=g.split("-")[-1])
        per[g] = {"bleu": s["bleu"], "chrf": s["chrf"]}
    return {"per_group": per, "bleu": sum(v["bleu"] for v in per.values()) / len(per),
            "chrf": sum(v["chrf"] for v in per.values()) / len(per), "seconds": time.perf_counter() - t}  # fmt: skip


@dataclass
class EvalSet:
    """Pre-collated, length-sorted batches of one split; `index` maps batch rows back to examples."""

    name: str
    groups: list[str]  # group of every example, in example order
    batches: list[dict]
    index: list[list[int]]

    @property
    def n(self) -> int:
        return len(self.groups)


def make_evalset(name: str, feats: list[dict], batch_size: int, tok) -> EvalSet:
    order = sorted(range(len(feats)), key=lambda i: len(feats[i]["input_ids"]))
    collate = TranslationCollator(tok, return_groups=False)
    batches, index = [], []
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        batches.append(collate([feats[i] for i in idx]))
        index.append(idx)
    return EvalSet(name, [f["group"] for f in feats], batches, index)


def english_features(tok, examples, max_length: int) -> list[dict]:
    """Plain English verses as language-modelling examples: BOS + text + EOS, loss on every text token."""
    out = []
    for e in examples:
        ids = list(tok(e.src, add_special_tokens=True)["input_ids"])[: max_length - 1] + [tok.eos_token_id]
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [IGNORE_INDEX] + ids[1:],
                    "group": "en"})  # fmt: skip
    return out


@torch.inference_mode()
def sentence_nll(model, es: EvalSet) -> list[list[float]]:
    """Per example ``[summed NLL over its target tokens, number of target tokens]`` (teacher forcing)."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[list[float]] = [[0.0, 0.0] for _ in range(es.n)]
    try:
        for batch, idx in zip(es.batches, es.index):
            labels = batch["labels"].to(device)
            targets = labels[:, 1:]
            cols = (targets != IGNORE_INDEX).any(0).nonzero().flatten()
            start, stop = int(cols[0]), int(cols[-1]) + 1
            keep = torch.arange(start, stop, device=device)
            logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                           logits_to_keep=keep).logits.float()  # fmt: skip
            tgt = targets[:, start:stop]
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tgt, ignore_index=IGNORE_INDEX,
                                                    reduction="none")  # fmt: skip
            sums, counts = nll.sum(1).tolist(), (tgt != IGNORE_INDEX).sum(1).tolist()
            for j, i in enumerate(idx):
                out[i] = [float(sums[j]), float(counts[j])]
    finally:
        model.train(was)
    return out
