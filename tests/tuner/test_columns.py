"""Column units: selected input columns train as (rows not selected) x k deltas, exactly as a dense ``W0 + delta``.

Every check compares against an independent reference built by hand in this file: a copy of the base model whose
weights hold ``W0 + rows + columns`` as full trainable tensors (the dense gradient's selected entries are what the
deltas must get), PEFT's own save/load, or hand-written expected counts.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from testing_utils import ShapeRecorder, adapted
from tiny_models import make_loss_inputs, make_model

from neuron_peft import NeuronSelectConfig, route
from neuron_peft.errors import AdapterMismatchError

OUTPUT_PROJECTIONS = {"llama": ["o_proj", "down_proj"], "gpt2": ["c_proj"], "qwen2": ["o_proj", "down_proj"]}


def column_config(arch, path="auto", rows_too=False, groups=(), init_weights=False, seed=0):
    """Random columns in every output projection (3 agnostic + 2 per group); with ``rows_too`` also 2 agnostic rows
    in each, so some weight entries lie in a selected row and a selected column."""
    gen = torch.Generator().manual_seed(seed)
    probe = get_peft_model(make_model(arch), NeuronSelectConfig(target_modules=OUTPUT_PROJECTIONS[arch]))
    columns, language = {}, {g: {} for g in groups}
    neurons = {}
    for name, layer in adapted(probe).items():
        perm = torch.randperm(layer.in_features, generator=gen).tolist()
        columns[name] = perm[:3]
        for i, g in enumerate(groups):
            language[g][name] = perm[3 + 2 * i : 5 + 2 * i]
        if rows_too:
            neurons[name] = torch.randperm(layer.out_features, generator=gen)[:2].tolist()
    return NeuronSelectConfig(
        target_modules=OUTPUT_PROJECTIONS[arch], columns=columns, language_columns=language or None,
        neurons=neurons or None, init_weights=init_weights, update_path=path, fan_in_fan_out=arch == "gpt2",
    )  # fmt: skip


def build_columns(arch, **kw):
    base = make_model(arch)
    return base, get_peft_model(copy.deepcopy(base), column_config(arch, **kw))


def other_rows(layer, name="default"):
    keep = torch.ones(layer.out_features, dtype=torch.bool)
    keep[layer.neuron_select_indices[name]] = False
    return keep.nonzero().flatten()


def dense_reference(base, model):
    """Base copy with W[rows] += delta, b[rows] += bias_delta and W[other rows, cols] += col_delta, trainable."""
    ref = copy.deepcopy(base)
    ref.requires_grad_(False)
    modules = dict(ref.named_modules())
    for name, layer in adapted(model).items():
        target = modules[name]
        with torch.no_grad():
            w = target.weight.t() if layer.fan_in_fan_out else target.weight  # (out, in) view
            rows = layer.neuron_select_indices["default"]
            w[rows] += layer.neuron_select_delta["default"]
            if "default" in layer.neuron_select_bias_delta:
                target.bias[rows] += layer.neuron_select_bias_delta["default"]
            if "default" in layer.neuron_select_col_delta:
                cols = layer.neuron_select_col_indices["default"]
                r = other_rows(layer)
                w[r.unsqueeze(1), cols.unsqueeze(0)] += layer.neuron_select_col_delta["default"]
        target.weight.requires_grad_(True)
    return ref


def assert_base_is_w0(model, base):
    """Outside a layer call the base weights hold exactly W0 (units are swapped in per call only)."""
    modules = dict(base.named_modules())
    for name, layer in adapted(model).items():
        torch.testing.assert_close(layer.get_base_layer().weight, modules[name].weight, atol=0, rtol=0)


def weight_grad(ref, name, layer):
    g = dict(ref.named_modules())[name].weight.grad
    return g.t() if layer.fan_in_fan_out else g


def assert_unit_grads(model, ref, scale=1.0, groups_of=None, atol=1e-6):
    """Each delta's gradient equals the dense gradient's entries it owns (`scale` times, for routed subsets)."""
    for name, layer in adapted(model).items():
        g = weight_grad(ref, name, layer) * scale
        rows = layer.neuron_select_indices["default"]
        if rows.numel():
            torch.testing.assert_close(layer.neuron_select_delta["default"].grad, g[rows], atol=atol, rtol=1e-4)
        cols = layer.neuron_select_col_indices["default"]
        want = g[other_rows(layer)][:, cols]
        got = layer.neuron_select_col_delta["default"].grad
        if groups_of is not None:
            keep = groups_of(layer)
            got, want = got[:, keep], want[:, keep]
        torch.testing.assert_close(got, want, atol=atol, rtol=1e-4, msg=name)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("path", ["auto", "additive"])
@pytest.mark.parametrize("rows_too", [False, True])
def test_forward_and_gradients_equal_dense_reference(arch, path, rows_too):
    base, model = build_columns(arch, path=path, rows_too=rows_too)
    ref = dense_reference(base, model)
    batch = make_loss_inputs(arch, batch=2, seq=7)
    loss, ref_loss = model(**batch).loss, ref(**batch).loss
    assert abs(loss.item() - ref_loss.item()) < 1e-5
    loss.backward()
    ref_loss.backward()
    assert_unit_grads(model, ref)
    for p in model.parameters():
        if not p.requires_grad:
            assert p.grad is None
    assert_base_is_w0(model, base)


def test_entry_in_a_selected_row_and_column_is_one_parameter():
    rows, cols = [1, 4], [0, 3, 5]
    cfg = NeuronSelectConfig(target_modules=r"model\.layers\.0\.mlp\.down_proj", neurons={"model.layers.0.mlp.down_proj": rows},
                             columns={"model.layers.0.mlp.down_proj": cols}, init_weights=False)  # fmt: skip
    model = get_peft_model(make_model("llama"), cfg)
    layer = adapted(model)["model.layers.0.mlp.down_proj"]
    n_out, n_in = layer.out_features, layer.in_features
    assert layer.neuron_select_delta["default"].shape == (2, n_in)
    assert layer.neuron_select_col_delta["default"].shape == (n_out - 2, 3)  # the two selected rows are skipped
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 2 * n_in + (n_out - 2) * 3  # hand count: every trained entry once
    # the dense delta at (row 1, col 0) is exactly the row delta's entry
    dense = layer.get_delta_weight("default")
    assert dense[1, 0] == layer.neuron_select_delta["default"][0, 0]
    assert int((dense != 0).sum()) == 2 * n_in + (n_out - 2) * 3
    summary = model.base_model.selection_summary()
    assert summary["columns"] == 3 and summary["adapter_params"] == trainable


@pytest.mark.parametrize("path", ["auto", "additive"])
def test_routing_a_groups_columns_learn_from_its_samples_only(path):
    base, model = build_columns("llama", path=path, groups=("de", "fr"))
    ref_all, ref_fr = dense_reference(base, model), dense_reference(base, model)
    batch = make_loss_inputs("llama", batch=2, seq=7)  # no -100 labels: equal token counts per sample
    model(**batch, neuron_groups=["fr", "de"]).loss.backward()
    ref_all(**batch).loss.backward()
    ref_fr(**{k: v[:1] for k, v in batch.items()}).loss.backward()  # sample 0 alone: half the full batch's gradient

    def owned(gid):
        return lambda layer: layer.neuron_select_col_groups["default"] == gid

    assert_unit_grads(model, ref_all, groups_of=owned(-1))  # agnostic columns: every sample
    assert_unit_grads(model, ref_fr, scale=0.5, groups_of=owned(1))  # "fr" (groups sorted: de=0, fr=1)
    # "de" columns get only sample 1's share: full minus sample 0's
    ref_de = dense_reference(base, model)
    ref_de(**{k: v[1:] for k, v in batch.items()}).loss.backward()
    assert_unit_grads(model, ref_de, scale=0.5, groups_of=owned(0))

    model.zero_grad()
    with route(model, ["de", "de"]):
        model(**batch).loss.backward()
    for layer in adapted(model).values():
        fr_cols = layer.neuron_select_col_groups["default"] == 1
        assert torch.count_nonzero(layer.neuron_select_col_delta["default"].grad[:, fr_cols]) == 0


def test_merge_unmerge_and_merge_and_unload_match_the_adapter():
    base, model = build_columns("llama", rows_too=True, groups=("fr",))
    batch = make_loss_inputs("llama")
    with torch.no_grad():
        want = model(**batch).logits
        model.merge_adapter()
        torch.testing.assert_close(model(**batch).logits, want, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
        modules = dict(base.named_modules())
        for name, layer in adapted(model).items():
            torch.testing.assert_close(layer.get_base_layer().weight, modules[name].weight, atol=1e-6, rtol=0)
        merged = copy.deepcopy(model).merge_and_unload()
        torch.testing.assert_close(merged(**batch).logits, want, atol=1e-5, rtol=1e-5)
        ref = dense_reference(base, model)
        torch.testing.assert_close(ref(**batch).logits, want, atol=1e-5, rtol=1e-5)


def test_save_load_round_trip_file_size_and_mismatch(tmp_path):
    base, model = build_columns("llama", rows_too=True, groups=("de", "fr"))
    batch = make_loss_inputs("llama")
    with torch.no_grad():
        want = model(**batch).logits
    model.save_pretrained(tmp_path / "a")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "a" / "adapter_model.safetensors")
    n_col = sum(v.numel() for k, v in saved.items() if ".neuron_select_col_delta" in k)
    n_expected = sum(layer.neuron_select_col_delta["default"].numel() for layer in adapted(model).values())
    assert n_col == n_expected  # the file holds the (n, kc) deltas, not dense weights
    assert sum(v.numel() for v in saved.values()) < 0.2 * sum(p.numel() for p in base.parameters())
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, want, atol=0, rtol=0)
    # a config whose columns differ from the file's is refused, never half-loaded
    import json

    cfg_path = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    name = sorted(cfg["columns"])[0]
    used = set(cfg["columns"][name]).union(*(g.get(name, []) for g in cfg["language_columns"].values()))
    cfg["columns"][name] = [c for c in range(64) if c not in used][: len(cfg["columns"][name])]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(AdapterMismatchError, match="column indices in the adapter file differ"):
        PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a")


def test_columns_only_adapter_saves_and_loads(tmp_path):
    """Every layer trains columns only, so its row delta is (0, in_features) and its rows buffer empty: both are real
    (empty) values, saved as such (they were refused as if they were ZeRO-3 placeholders)."""
    base, model = build_columns("llama")
    batch = make_loss_inputs("llama")
    with torch.no_grad():
        want = dense_reference(base, model)(**batch).logits  # W0 + columns, built by hand
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    layers = adapted(model)
    assert {tuple(v.shape) for k, v in saved.items() if ".neuron_select_delta" in k} == {(0, 32), (0, 64)}
    assert sum(v.numel() for v in saved.values()) == sum(3 * layer.out_features + 3 for layer in layers.values())
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, want, atol=1e-5, rtol=1e-5)
    for name, layer in adapted(loaded).items():
        torch.testing.assert_close(layer.neuron_select_col_delta["default"], layers[name].neuron_select_col_delta["default"],
                                   atol=0, rtol=0)  # fmt: skip


def test_save_tells_empty_tensors_from_zero3_placeholders():
    """Hand-made state dicts: a (0,) floating tensor is a ZeRO-3 placeholder (refused without a partitioned parameter
    behind it); a (0, in) row delta and a (0,) int64 rows buffer are empty in full, kept under any key (FSDP's)."""
    from neuron_peft.distributed import full_adapter_tensors

    real = {"_fsdp_wrapped_module.x.neuron_select_delta.a": torch.zeros(0, 8), "x.neuron_select_indices.a":
            torch.zeros(0, dtype=torch.long), "x.neuron_select_col_delta.a": torch.ones(4, 2)}  # fmt: skip
    out = full_adapter_tensors(torch.nn.Linear(2, 2), real)
    assert out.keys() == real.keys() and all(out[k] is v for k, v in real.items())
    with pytest.raises(RuntimeError, match="refusing to save 'x.neuron_select_bias_delta.a'"):
        full_adapter_tensors(torch.nn.Linear(2, 2), {**real, "x.neuron_select_bias_delta.a": torch.empty(0)})


def test_columns_only_layer_trains_only_tensors_that_can_move():
    """The (0, in) row delta of a columns-only layer stays frozen through PEFT's set_adapter / set_requires_grad /
    enable_adapter_layers (PEFT's generic suite requires every trainable adapter tensor to change in training)."""
    base, model = build_columns("llama")
    model.add_adapter("other", column_config("llama", seed=1, rows_too=True))
    model.base_model.set_adapter(["default", "other"])
    model.set_requires_grad(["default", "other"], True)
    model.base_model.disable_adapter_layers()
    model.base_model.enable_adapter_layers()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for layer in adapted(model).values():
        assert not layer.neuron_select_delta["default"].requires_grad  # (0, in): frozen
        assert layer.neuron_select_delta["other"].requires_grad  # 2 rows: trains
    # hand count: default has (out, 3) column deltas; other has 2 rows + (out - 2, 3) columns (+ no bias: Llama)
    want = sum(3 * m.out_features + 2 * m.in_features + (m.out_features - 2) * 3 for m in adapted(model).values())
    assert sum(p.numel() for p in trainable.values()) == want
    assert all(p.numel() for p in trainable.values())
    before = {n: p.detach().clone() for n, p in trainable.items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(**make_loss_inputs("llama")).loss.backward()
    opt.step()
    assert all(not torch.equal(p, before[n]) for n, p in trainable.items())
    assert_base_is_w0(model, base)


def test_several_adapters_add_up():
    base = make_model("llama")
    model = get_peft_model(copy.deepcopy(base), column_config("llama", seed=0))
    model.add_adapter("b", column_config("llama", seed=1, rows_too=True))
    model.base_model.set_adapter(["default", "b"])
    batch = make_loss_inputs("llama")
    ref = copy.deepcopy(base)
    modules = dict(ref.named_modules())
    with torch.no_grad():
        for name, layer in adapted(model).items():
            modules[name].weight += layer.get_delta_weight("default") + layer.get_delta_weight("b")
        torch.testing.assert_close(model(**batch).logits, ref(**batch).logits, atol=1e-5, rtol=1e-5)


def test_bad_columns_are_refused_with_the_problem_named():
    name = "model.layers.0.mlp.down_proj"
    with pytest.raises(AdapterMismatchError, match="column index 999 out of range"):
        get_peft_model(make_model("llama"), NeuronSelectConfig(target_modules=["down_proj"], columns={name: [999]}))
    with pytest.raises(TypeError, match="column index 1.5 is not an integer"):
        NeuronSelectConfig(target_modules=["down_proj"], columns={name: [1.5]})
    with pytest.raises(ValueError, match="columns .* listed in both"):
        NeuronSelectConfig(target_modules=["down_proj"], columns={name: [1]}, language_columns={"fr": {name: [1]}})
    with pytest.raises(AdapterMismatchError, match="unknown module"):
        get_peft_model(make_model("llama"), NeuronSelectConfig(target_modules=["down_proj"], columns={"nope": [1]}))
    every_row = list(range(32))
    with pytest.raises(AdapterMismatchError, match="every row is selected"):
        get_peft_model(make_model("llama"), NeuronSelectConfig(target_modules=["down_proj"], neurons={name: every_row},
                                                               columns={name: [0]}))  # fmt: skip


def test_columns_only_layer_keeps_only_the_selected_input_channels_for_backward():
    """The weight gradient of columns needs x[..., cols] only: the layer input itself is not saved."""
    _, model = build_columns("llama")
    layer = adapted(model)["model.layers.0.mlp.down_proj"]
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert not any(t.data_ptr() == x.data_ptr() for t in saved)
    kc = layer.num_columns("default")
    assert any(tuple(t.shape) == (2, 5, kc) for t in saved)
    activation_bytes = sum(t.numel() for t in saved if t.dim() == 3)
    assert activation_bytes == 2 * 5 * kc
    y.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("path", ["auto", "additive"])
def test_no_dense_weight_gradient_is_formed(path):
    _, model = build_columns("llama", path=path, rows_too=True)
    shapes = {s for layer in adapted(model).values() for s in [(layer.out_features, layer.in_features)]}
    loss = model(**make_loss_inputs("llama")).loss
    with ShapeRecorder() as rec:
        loss.backward()
    assert not (rec.shapes & shapes), rec.shapes & shapes


def test_trust_data_writes_deepcopy_and_disable_adapter_between_forward_and_backward():
    base, model = build_columns("llama", rows_too=True)
    batch = make_loss_inputs("llama")
    with torch.no_grad():
        for layer in adapted(model).values():
            layer.neuron_select_col_delta["default"].data.normal_(0, 0.05)  # a write the next call must see
    ref = dense_reference(base, model)
    loss = model(**batch).loss
    with model.disable_adapter(), torch.no_grad():  # a reference pass between forward and backward
        plain = model(**batch).logits
    torch.testing.assert_close(plain, base(**batch).logits, atol=1e-6, rtol=0)
    assert_base_is_w0(copy.deepcopy(model), base)  # a copy sees W0 in the base weights, deltas beside them
    loss.backward()
    ref(**batch).loss.backward()
    assert_unit_grads(model, ref)


def test_compiled_step_matches_eager():
    torch._dynamo.reset()
    base, model = build_columns("llama", rows_too=True, groups=("de", "fr"))
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager")
    batch = make_loss_inputs("llama")
    ids = torch.tensor([0, 1])
    compiled(**batch, neuron_groups=ids).loss.backward()
    eager(**batch, neuron_groups=["de", "fr"]).loss.backward()
    for (n, p), q in zip(model.named_parameters(), eager.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=n)
