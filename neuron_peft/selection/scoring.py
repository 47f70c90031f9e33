"""Scoring: first-order Taylor importance ``|a * dL/da|`` of every output neuron per group (or, for the channel
units of `channels.py`, ``|x * dL/dx|`` of every input channel), and activation similarity to a reference model,
accumulated over calibration batches by hooks on the targeted layers (`_Scorer`); also `measure_scoring_cost`. The
conventions are in `neuron_peft.selection`'s docstring."""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Mapping
from typing import Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ..distributed import all_reduce_max, all_reduce_sum
from ..errors import AdapterMismatchError
from .targets import _linear_in, _linear_out, model_part, resolve_target_modules

LAYER_SCORINGS = ("taylor", "activation_similarity")
TOKEN_REDUCTIONS = ("mean", "sum")


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        if hasattr(p, "ds_id") and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())  # ZeRO-3 (partitions may be offloaded)
        return p.device
    return torch.device("cpu")


def _to_device(batch: Mapping, device: torch.device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def _loss_mask(labels: torch.Tensor) -> torch.Tensor:
    """(batch, seq) bool: positions t with labels[:, t+1] != -100, i.e. the positions that produce a loss term."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != -100
    return mask


def _position_weights(
    out: torch.Tensor, mask: torch.Tensor, per_token: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows of `out` as (N, out_features), fp32 weights (N,)): the loss mask for (batch, seq) outputs, else ones.

    `per_token=False` (vision tower / projector layers) counts every position even when the patch count happens to
    equal the text length."""
    flat = out.reshape(-1, out.shape[-1])
    if per_token and out.dim() == 3 and tuple(out.shape[:2]) == tuple(mask.shape):
        w = mask.reshape(-1).to(torch.float32)
    else:
        w = torch.ones(flat.shape[0], dtype=torch.float32, device=out.device)
    return flat, w.to(out.device)


class _Frozen:
    """Context: eval mode, every parameter frozen; restores both exactly (per module / per parameter)."""

    def __init__(self, *models: Optional[nn.Module]):
        self.models = [m for m in models if m is not None]

    def __enter__(self):
        self.training = [[(m, m.training) for m in model.modules()] for model in self.models]
        self.flags = [[(p, p.requires_grad) for p in model.parameters()] for model in self.models]
        for model in self.models:
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
        return self

    def __exit__(self, *exc):
        for entries in self.training:
            for m, flag in entries:
                m.training = flag
        for entries in self.flags:
            for p, flag in entries:
                p.requires_grad_(flag)
        return False


class _Scorer:
    """Hooks on the targeted layers; `step(batch)` adds one batch's Taylor (and similarity) sums to a group.

    ``inputs=True`` scores each layer's input channels instead of its outputs: a forward pre-hook hands the layer
    a fresh view of its input that only this layer reads, so ``dL/dx`` is the gradient through this layer alone
    (an input shared with other layers, such as the hidden state q/k/v all read, would otherwise get their sum)."""

    def __init__(self, model, names, groups, reference=None, inputs=False):
        self.model, self.names, self.groups, self.reference = model, names, groups, reference
        self.per_token = [model_part(n) == "language" for n in names]  # vision/projector: every patch counts
        modules = dict(model.named_modules())
        self.modules = [modules[n] for n in names]
        self.out_features = [_linear_out(m) for m in self.modules]
        if inputs and reference is not None:
            raise ValueError("activation similarity compares layer outputs; input channels have no reference score")
        self.inputs = inputs
        widths = [_linear_in(m) for m in self.modules] if inputs else self.out_features
        n_groups = len(groups)
        self.taylor = [torch.zeros(n_groups, n, dtype=torch.float32) for n in widths]
        self.counts = torch.zeros(len(names), n_groups, dtype=torch.float64)  # counted positions per layer
        self.cos_sum = torch.zeros(len(names), n_groups, dtype=torch.float64)
        self.loss_tokens = [0] * n_groups
        self.batches = [0] * n_groups
        self.lockstep = False  # set when every rank must run the same passes (sharded model)
        self._outs: list[list[torch.Tensor]] = [[] for _ in names]
        self._ref_outs: list[list[torch.Tensor]] = [[] for _ in names]
        self._handles = []
        # no KV cache: it would only hold extra activations
        self._no_cache = "use_cache" in inspect.signature(model.forward).parameters
        if reference is not None:
            self.ref_modules = _reference_modules(reference, names, self.out_features)

    def __enter__(self):
        for i, m in enumerate(self.modules):
            if self.inputs:
                self._handles.append(m.register_forward_pre_hook(self._make_input_hook(i)))
            else:
                self._handles.append(m.register_forward_hook(self._make_hook(i)))
        if self.reference is not None:
            for i, m in enumerate(self.ref_modules):
                self._handles.append(m.register_forward_hook(self._make_ref_hook(i)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._clear()
        return False

    def _clear(self):
        for lst in self._outs + self._ref_outs:
            lst.clear()

    def reduce(self) -> None:
        """Sum every accumulator over all processes (a no-op without torch.distributed), so ranks scoring different
        calibration shards end up with the scores of the union of the shards."""

        n = len(self.taylor)
        ints = torch.tensor(self.loss_tokens + self.batches, dtype=torch.int64)
        reduced = all_reduce_sum(self.taylor + [self.counts, self.cos_sum, ints])
        self.taylor, (self.counts, self.cos_sum, ints) = reduced[:n], reduced[n:]
        g = len(self.groups)
        self.loss_tokens, self.batches = ints[:g].tolist(), ints[g:].tolist()

    def _make_hook(self, i):
        def hook(module, args, out):
            if not torch.is_tensor(out):
                raise TypeError(f"layer {self.names[i]!r} returned {type(out).__name__}, expected a tensor")
            if not out.requires_grad:
                # nothing upstream needs grad (params are frozen): make this output a leaf we can differentiate
                out = out.detach().requires_grad_(True)
            self._outs[i].append(out)
            return out

        return hook

    def _make_input_hook(self, i):
        def hook(module, args):
            if not args or not torch.is_tensor(args[0]):
                raise TypeError(f"layer {self.names[i]!r} was called without a tensor input to score")
            x = args[0]
            # a view only this layer reads (see the class docstring); a leaf when nothing upstream needs grad
            x = x.view_as(x) if x.requires_grad else x.detach().requires_grad_(True)
            self._outs[i].append(x)
            return (x, *args[1:])

        return hook

    def _make_ref_hook(self, i):
        def hook(module, args, out):
            self._ref_outs[i].append(out.detach())

        return hook

    @staticmethod
    def _check_batch(batch, group, index):
        if not isinstance(batch, Mapping):
            raise TypeError(f"group {group!r} batch {index}: expected a dict of tensors, got {type(batch).__name__}")
        if not torch.is_tensor(batch.get("labels")):
            raise ValueError(f"group {group!r} batch {index}: missing tensor 'labels'")
        if "input_ids" not in batch and "inputs_embeds" not in batch:
            raise ValueError(f"group {group!r} batch {index}: missing tensor 'input_ids'")
        if batch["labels"].dim() != 2:
            raise ValueError(f"group {group!r} batch {index}: labels must be (batch, seq)")

    def step(self, g: int, batch: Mapping, index: int, accumulate: bool = True) -> bool:
        """Score one batch for group index g; False (and nothing added) when it has no loss tokens.

        ``accumulate=False`` runs the forward and backward without adding anything: a rank with fewer batches does
        this so that sharded models (FSDP2, ZeRO-3), whose forward and backward gather parameters collectively, see
        the same number of passes on every rank. With ``self.lockstep`` a batch without loss tokens runs this way.
        """
        group = self.groups[g]
        self._check_batch(batch, group, index)
        batch = _to_device(batch, _device_of(self.model))
        if self._no_cache and "use_cache" not in batch:
            batch["use_cache"] = False
        mask = _loss_mask(batch["labels"])
        n_tokens = int(mask.sum())
        if n_tokens == 0:
            if not self.lockstep:
                return False
            accumulate = False
        self._clear()
        try:
            if self.reference is not None:
                ref_batch = _to_device(batch, _device_of(self.reference))
                if "use_cache" not in inspect.signature(self.reference.forward).parameters:
                    ref_batch.pop("use_cache", None)
                with torch.no_grad():
                    self.reference(**ref_batch)
            with torch.enable_grad():
                out = self.model(**batch)
                loss = getattr(out, "loss", None)
                if loss is None and isinstance(out, Mapping):
                    loss = out.get("loss")
                if loss is None:
                    raise ValueError(f"group {group!r} batch {index}: the model returned no loss (are labels passed?)")
                if not accumulate:  # only the passes (and their collectives) count, not the values
                    loss = torch.nan_to_num(loss) * 0.0
                if not torch.isfinite(loss).all():
                    raise FloatingPointError(
                        f"group {group!r} batch {index}: loss is {float(loss.detach())} (not finite)"
                    )
                acts = [(i, a) for i, outs in enumerate(self._outs) for a in outs]
                if not acts:
                    raise RuntimeError("no targeted layer ran in the forward pass")
                grads = torch.autograd.grad(loss * n_tokens, [a for _, a in acts], allow_unused=True)
            if not accumulate:
                return False
            for (i, a), grad in zip(acts, grads):
                flat, w = _position_weights(a.detach(), mask, self.per_token[i])
                self.counts[i, g] += float(w.sum())
                if grad is None:
                    continue  # the layer does not reach the loss: its score is 0
                prod = (flat.float() * grad.reshape(flat.shape).float()).abs_()
                contrib = (w @ prod).cpu()
                if not torch.isfinite(contrib).all():
                    raise FloatingPointError(
                        f"group {group!r} batch {index}: non-finite Taylor score in layer {self.names[i]!r}"
                    )
                self.taylor[i][g] += contrib
            if self.reference is not None:
                self._similarity(g, mask, group, index)
        finally:
            self._clear()
        self.loss_tokens[g] += n_tokens
        self.batches[g] += 1
        return True

    def _similarity(self, g, mask, group, index):
        for i, (outs, refs) in enumerate(zip(self._outs, self._ref_outs)):
            if len(outs) != len(refs):
                raise RuntimeError(
                    f"layer {self.names[i]!r} ran {len(outs)} time(s) in the model but {len(refs)} in the reference"
                )
            for a, r in zip(outs, refs):
                if a.shape != r.shape:
                    raise AdapterMismatchError(
                        f"layer {self.names[i]!r}: output shape {tuple(a.shape)} differs from the reference's "
                        f"{tuple(r.shape)}"
                    )
                flat, w = _position_weights(a.detach(), mask, self.per_token[i])
                cos = nn.functional.cosine_similarity(
                    flat.float(), r.reshape(flat.shape).to(flat.device).float(), dim=-1
                )
                s = float(w @ cos)
                if not math.isfinite(s):
                    raise FloatingPointError(
                        f"group {group!r} batch {index}: non-finite activation similarity in layer {self.names[i]!r}"
                    )
                self.cos_sum[i, g] += s


def _reference_modules(reference: nn.Module, names: list[str], out_features: list[int]) -> list[nn.Module]:
    """The reference's modules with the same names (a PeftModel reference is looked up under base_model.model.)."""
    ref = dict(reference.named_modules())
    found, missing = [], []
    for name, n_out in zip(names, out_features):
        module = ref.get(name, ref.get(f"base_model.model.{name}"))
        if module is None:
            missing.append(name)
            continue
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        ref_out = _linear_out(base)
        if ref_out != n_out:
            raise AdapterMismatchError(
                f"reference_model: layer {name!r} has {ref_out} output rows, the model has {n_out}"
            )
        found.append(module)
    if missing:
        raise AdapterMismatchError(
            f"reference_model has no module(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} "
            f"({len(missing)} of {len(names)} targeted layers); it must have the same architecture and module names"
        )
    return found


def _score_lockstep(scorer: _Scorer, groups: list, progress: bool) -> list[int]:
    """Score every group with the same number of passes on every rank (the maximum over ranks); a rank that runs
    out of batches repeats one of its batches without adding it. Returns this rank's batch count per group."""

    lists = [list(batches) for _, batches in groups]
    spare = [b for batches in lists for b in batches]
    maxima = all_reduce_max([len(b) for b in lists] + [0 if spare else 1])
    if maxima[-1]:
        raise ValueError(
            "select_neurons on a sharded model: every process needs at least one calibration batch (forward and "
            "backward gather the parameters together with the other processes)"
        )
    for g, ((group, _), batches) in enumerate(zip(groups, lists)):
        for index in tqdm(range(maxima[g]), desc=f"scoring {group}", disable=not progress):
            if index < len(batches):
                scorer.step(g, batches[index], index)
            else:
                scorer.step(g, batches[-1] if batches else spare[0], index, accumulate=False)
    return [len(b) for b in lists]


def _taylor_layer_scores(neuron_scores: dict[str, torch.Tensor], names: list[str], parts: list[str]) -> torch.Tensor:
    """(layers, groups): per group the layer's mean neuron score over the sum of those means within its part."""
    means = torch.stack([neuron_scores[n].mean(dim=1) for n in names])  # (L, G)
    out = torch.zeros_like(means)
    for part in set(parts):
        idx = torch.tensor([i for i, p in enumerate(parts) if p == part])
        sums = means[idx].sum(dim=0, keepdim=True)
        out[idx] = means[idx] / torch.where(sums > 0, sums, torch.ones_like(sums))
    return out


def measure_scoring_cost(model: nn.Module, batch: Mapping, target_modules="all-linear", repeats: int = 3) -> dict:
    """Seconds per calibration batch for scoring vs one full fine-tuning step (forward+backward+AdamW) on it.

    The training step runs on a deep copy so `model` is untouched; one warm-up call each, then interleaved runs.
    """
    import copy

    names = resolve_target_modules(model, target_modules)

    def score_once():
        with _Frozen(model), _Scorer(model, names, ["bench"]) as scorer:
            scorer.step(0, batch, 0)

    train_model = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(train_model.parameters(), lr=1e-5)
    dev_batch = _to_device(batch, _device_of(train_model))
    if "use_cache" in inspect.signature(train_model.forward).parameters:
        dev_batch.setdefault("use_cache", False)  # as in the scoring pass

    def train_once():
        train_model(**dev_batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def timed(fn):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    score_once(), train_once()  # warm-up
    # interleaved so that load changes on a shared machine hit both alike; min = least disturbed run
    pairs = [(timed(score_once), timed(train_once)) for _ in range(repeats)]
    score_s, train_s = min(p[0] for p in pairs), min(p[1] for p in pairs)
    return {"score_s": score_s, "train_step_s": train_s, "ratio": score_s / train_s}
