"""Multi-process training and selection on CPU (gloo): 2 processes give the same result as 1 process.

One spawn of 2 worker processes runs every scenario (DDP on the live and the additive path, FSDP2 ``fully_shard``,
the selection pass on different calibration shards, also on an FSDP2-sharded model); the parent process computes
the 1-process references on the union of the data and the tests compare. Bounded: the workers are killed after
`TIMEOUT_S` and every collective has a timeout.
"""

from __future__ import annotations

import copy
import os
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from distributed_utils import GROUPS, TARGETS, build, deltas, global_batches, run_workers
from tiny_models import VOCAB, tiny_qwen2

from neuron_peft import NeuronSelectLayer, select_neurons
from neuron_peft.distributed import prepare_for_sharding

TIMEOUT_S = 150

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")


def train(model, batches, rank=0, world=1, call=None):
    """AdamW steps on each rank's contiguous share of every global batch (the whole batch when world == 1)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, foreach=False)
    call = call or model
    for ids, groups in batches:
        share = ids.shape[0] // world
        sl = slice(rank * share, (rank + 1) * share)
        loss = call(input_ids=ids[sl], labels=ids[sl], neuron_groups=groups[sl]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model


def calibration(shard: int | None):
    """Per-group calibration batches; `shard` r in (0, 1) takes an uneven part of them (None = the union)."""
    gen = torch.Generator().manual_seed(11)
    data = {}
    for g in GROUPS:
        batches = []
        for _ in range(3):
            ids = torch.randint(1, VOCAB, (2, 8), generator=gen)
            labels = ids.clone()
            labels[:, :3] = -100  # a prompt that produces no loss term
            batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
        data[g] = batches
    if shard is None:
        return data
    # rank 0: fr batches 0,1 and de batch 0; rank 1: fr batch 2 and de batches 1,2 (uneven counts per rank)
    return {
        "fr": data["fr"][:2] if shard == 0 else data["fr"][2:],
        "de": data["de"][:1] if shard == 0 else data["de"][1:],
    }


def base_weights(model) -> dict:
    return {n: p.detach().clone() if type(p.data) is torch.Tensor else p.detach()
            for n, p in model.named_parameters() if "base_layer.weight" in n}  # fmt: skip


def pretrained_base_weights() -> dict:
    """The base weights of a freshly built adapted model (nothing has run on it yet)."""
    return base_weights(build("auto"))


def selection_result(sel) -> dict:
    return {
        "kept": sel.kept_layers,
        "neurons": sel.neurons,
        "language": sel.language_neurons,
        "loss_tokens": sel.loss_tokens,
        "scores": {k: v.clone() for k, v in sel.neuron_scores.items()},
    }


SELECT_KW = dict(target_modules=TARGETS, layer_ratio=0.5, neuron_ratio=0.5, specific_ratio=0.25, progress=False)


# ---------------------------------------------------------------------------------------------------- worker side
def _ddp(path):
    def run(rank, world):
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = build(path)
        with torch.no_grad():  # a forward before wrapping: DDP then broadcasts the base weights, which must be W0
            model(input_ids=torch.randint(1, VOCAB, (1, 5)))
        model.train()
        ddp = DDP(model)  # wraps the PeftModel; neuron_groups travels as a forward kwarg
        train(model, global_batches(), rank, world, call=ddp)
        live = [m._live_allowed() for m in model.modules() if isinstance(m, NeuronSelectLayer)]
        return {"deltas": deltas(model), "live": live, "base": base_weights(model)}

    return run


def _fsdp2(rank, world):
    from torch.distributed.fsdp import fully_shard

    model = build("auto")
    inner = model.base_model.model
    for block in inner.model.layers:
        fully_shard(block)
    fully_shard(inner)
    sharded = [type(m.get_base_layer().weight).__name__ for m in model.modules() if isinstance(m, NeuronSelectLayer)]
    model.train()
    train(model, global_batches(), rank, world)
    base = {n: w.full_tensor() for n, w in base_weights(model).items()}  # gathered from the shards
    try:
        model.merge_adapter()
        merge_error = None
    except NotImplementedError as e:
        merge_error = str(e)
    return {"deltas": deltas(model), "weight_types": sharded, "base": base, "merge_error": merge_error}


def _select(rank, world):
    sel = select_neurons(tiny_qwen2(seed=0).eval(), calibration(rank), **SELECT_KW)
    return selection_result(sel)


def _select_fsdp2(rank, world):
    from torch.distributed.fsdp import fully_shard

    model = tiny_qwen2(seed=0).eval()
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    sel = select_neurons(model, calibration(rank), **SELECT_KW)
    return selection_result(sel)


SCENARIOS = {
    "ddp_live": _ddp("auto"),
    "ddp_additive": _ddp("additive"),
    "fsdp2": _fsdp2,
    "select": _select,
    "select_fsdp2": _select_fsdp2,
}


def _worker(rank, world, port, out_dir):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    results = {}
    try:
        for name, fn in SCENARIOS.items():
            try:
                results[name] = fn(rank, world)
            except Exception:  # reported per scenario by the tests
                results[name] = {"error": traceback.format_exc()}
            dist.barrier()
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------- parent side
@pytest.fixture(scope="module")
def worker_results(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("dist"))
    return run_workers(_worker, out_dir, TIMEOUT_S, "distributed workers")


def _scenario(results, name):
    per_rank = [r[name] for r in results]
    for rank, r in enumerate(per_rank):
        if "error" in r:
            pytest.fail(f"rank {rank} failed in scenario {name!r}:\n{r['error']}")
    return per_rank


def _assert_same_deltas(got: dict, expected: dict, atol=1e-5):
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=atol, msg=name)


@pytest.fixture(scope="module")
def reference_deltas():
    out = {}
    for path in ("auto", "additive"):
        model = build(path).train()
        out[path] = deltas(train(model, global_batches()))
    return out


@pytest.mark.parametrize("path", ["live", "additive"])
def test_ddp_two_processes_match_one_process(worker_results, reference_deltas, path):
    ranks = _scenario(worker_results, f"ddp_{path}")
    expected = reference_deltas["auto" if path == "live" else "additive"]
    # the reference moved every delta, language rows included (else the comparison would be vacuous)
    for name, value in expected.items():
        assert value.abs().sum() > 0, name
    for r in ranks:
        _assert_same_deltas(r["deltas"], expected)
        # the live path really ran under DDP (and the additive one did not)
        assert all(r["live"]) if path == "live" else not any(r["live"])
        _assert_same_deltas(r["base"], pretrained_base_weights(), atol=0)  # W0 never left in the base weights


def test_fsdp2_two_processes_match_one_process(worker_results, reference_deltas):
    ranks = _scenario(worker_results, "fsdp2")
    for r in ranks:
        assert set(r["weight_types"]) == {"DTensor"}, r["weight_types"]
        # FSDP2 hands each forward a temporary all-gathered weight; rows swapped into it are put back in the call,
        # so the shards still hold exactly the pretrained weights after training
        _assert_same_deltas(r["deltas"], reference_deltas["auto"])
        _assert_same_deltas(r["base"], pretrained_base_weights(), atol=0)
        assert r["merge_error"] and "sharded base weight" in r["merge_error"]


@pytest.mark.parametrize("scenario", ["select", "select_fsdp2"])
def test_selection_is_reduced_across_processes(worker_results, scenario):
    ranks = _scenario(worker_results, scenario)
    expected = selection_result(
        select_neurons(copy.deepcopy(tiny_qwen2(seed=0)).eval(), calibration(None), **SELECT_KW)
    )
    assert expected["language"], "the reference selection has no language-specific rows"
    for r in ranks:
        assert r["kept"] == expected["kept"]
        assert r["neurons"] == expected["neurons"]
        assert r["language"] == expected["language"]
        assert r["loss_tokens"] == expected["loss_tokens"]
        for name, scores in expected["scores"].items():
            torch.testing.assert_close(r["scores"][name], scores, rtol=1e-5, atol=1e-7, msg=name)


# ---------------------------------------------------------------------------------------------------- one process
def _replace_base_weights(model):
    """What a sharding wrapper does: the layers' base weights become other Parameter objects (same values)."""
    for layer in model.modules():
        if isinstance(layer, NeuronSelectLayer):
            base = layer.get_base_layer()
            base.weight = torch.nn.Parameter(base.weight.detach().clone(), requires_grad=False)


def test_base_weights_stay_pretrained_through_copies_and_replacement():
    """Rows are swapped in per call only: after forwards the base weights are W0, a deep copy is exact, and a base
    weight replaced by another Parameter (what a sharding wrapper does) is used as is and never written."""
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    model = build("auto").eval()
    expected = model(input_ids=ids).logits.detach()
    _assert_same_deltas(base_weights(model), pretrained_base_weights(), atol=0)
    clone = copy.deepcopy(model)
    torch.testing.assert_close(clone(input_ids=ids).logits, expected, rtol=0, atol=0)

    _replace_base_weights(clone)
    torch.testing.assert_close(clone(input_ids=ids).logits, expected, rtol=0, atol=0)
    _assert_same_deltas(base_weights(clone), pretrained_base_weights(), atol=0)

    assert prepare_for_sharding(model) is model  # kept for compatibility: nothing to restore any more
    _replace_base_weights(model)
    torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=0, atol=0)
    base = build("auto").eval()
    with base.disable_adapter():
        original = {n: p for n, p in base.named_parameters() if "base_layer.weight" in n}
    for n, p in model.named_parameters():
        if n in original:
            assert torch.equal(p, original[n]), n  # no live rows leaked into the new weights


def test_gathered_parameters_go_through_peft_and_refuse_what_peft_cannot_gather(monkeypatch):
    """gathered_parameters is PEFT's gather_params_ctx, read-only (modifier_rank=None); DeepSpeed is faked here (it
    needs an accelerator). Partitioned parameters without transformers' ZeRO-3 integration are an error, not a read
    of empty shards."""
    import sys
    import types

    import peft.utils.integrations as integrations

    from neuron_peft.distributed import gathered_parameters

    plain = torch.nn.Parameter(torch.ones(2))
    with gathered_parameters([plain, None]):
        pass
    partitioned = torch.nn.Parameter(torch.empty(0))
    partitioned.ds_id = 7
    with pytest.raises(RuntimeError, match="partitioned by DeepSpeed ZeRO-3.*integration is not active"):
        with gathered_parameters([partitioned]):
            pass

    calls = []

    class GatheredParameters:
        def __init__(self, params, modifier_rank=0, fwd_module=None):
            calls.append((list(params), modifier_rank))

        def __enter__(self):
            calls.append("enter")

        def __exit__(self, *exc):
            calls.append("exit")

    fake = types.ModuleType("deepspeed")
    fake.zero = types.SimpleNamespace(GatheredParameters=GatheredParameters)
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    monkeypatch.setattr(integrations, "check_deepspeed_zero3_enabled", lambda: True)
    with gathered_parameters([partitioned, None]):
        calls.append("read")
    assert calls == [([partitioned], None), "enter", "read", "exit"]
