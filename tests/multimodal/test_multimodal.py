"""Vision-language models: part detection on LLaVA / Qwen2-VL / Qwen2.5-VL / Gemma 3 built from configs, per-part
budgets, image batches (direct and through a processor), routing, save/load/merge, training on rendered images."""

from __future__ import annotations

import warnings

import numpy as np
import peft
import pytest
import torch
from PIL import Image

import neuron_peft
from neuron_peft.data import IGNORE_INDEX, OCR_PROMPT, ParallelExample, images
from neuron_peft.multimodal import (
    ImageTranslationDataset,
    RenderedTranslationDataset,
    VLMInputs,
    char_tokenizer,
    find_fonts,
    render_text_image,
    select_vlm_neurons,
    vlm_calibration_batches,
    vlm_features,
    vlm_part_roots,
    vlm_target_modules,
    wrap_text,
)
from neuron_peft.selection import model_part
from neuron_peft.selection.scoring import _position_weights
from neuron_peft.tuner.packed_patches import packed_patch_samples, packs_patches

TOK = char_tokenizer(["<image>"])  # <image> = 4
V = len(TOK) + 4  # room for Qwen / Gemma image, boi/start, eoi/end ids above the tokenizer's
TEXT = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)  # fmt: skip
PAIRS = [
    ParallelExample("In the beginning", "Au commencement", "en-fr", "en", "fr"),
    ParallelExample("God said let there be light", "Dieu dit", "en-fr", "en", "fr"),
    ParallelExample("In the beginning", "Im Anfang", "en-de", "en", "de"),
    ParallelExample("And there was light", "Und es ward Licht", "en-de", "en", "de"),
]


def tiny_vlm(arch: str, seed: int = 0, **vision):
    import transformers as tf

    torch.manual_seed(seed)
    if arch == "llava":
        cfg = tf.LlavaConfig(
            vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, image_size=16, patch_size=8, projection_dim=32),
            text_config=dict(model_type="llama", **TEXT), image_token_id=4,
        )  # fmt: skip
        return tf.LlavaForConditionalGeneration(cfg).eval()
    if arch in ("qwen2_vl", "qwen2_5_vl"):
        text = dict(TEXT, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
        ids = dict(image_token_id=V - 4, video_token_id=V - 3, vision_start_token_id=V - 2, vision_end_token_id=V - 1)
        if arch == "qwen2_vl":
            vis = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=4,
                       spatial_merge_size=2, temporal_patch_size=2)  # fmt: skip
            return tf.Qwen2VLForConditionalGeneration(
                tf.Qwen2VLConfig(text_config=text, vision_config=vis, **ids)
            ).eval()
        vis = dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=32, num_heads=4, patch_size=4,
                   spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1])  # fmt: skip
        return tf.Qwen2_5_VLForConditionalGeneration(
            tf.Qwen2_5_VLConfig(text_config=text, vision_config=vis, **ids)
        ).eval()
    if arch == "gemma3":
        cfg = tf.Gemma3Config(
            text_config=dict(TEXT, head_dim=8, sliding_window=256),  # the image stays in view
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               image_size=16, patch_size=4, **{"vision_use_head": False, **vision}),
            mm_tokens_per_image=4, image_token_index=V - 3, boi_token_index=V - 2, eoi_token_index=V - 1,
        )  # fmt: skip
        model = tf.Gemma3ForConditionalGeneration(cfg).eval()
        with torch.no_grad():  # initialised to zeros: no gradient would reach the vision tower
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.2)
        return model
    raise ValueError(arch)


VLMS = ["llava", "qwen2_vl", "qwen2_5_vl", "gemma3"]
# a Linear expected in each part (None: the part has no Linear layer)
EXPECTED = {
    "llava": ("model.vision_tower.encoder.layers.0.mlp.fc1", "model.multi_modal_projector.linear_1",
              "model.language_model.layers.1.mlp.down_proj"),
    "qwen2_vl": ("model.visual.blocks.0.attn.qkv", "model.visual.merger.mlp.0",
                 "model.language_model.layers.0.self_attn.q_proj"),
    "qwen2_5_vl": ("model.visual.blocks.1.mlp.gate_proj", "model.visual.merger.mlp.2",
                   "model.language_model.layers.1.mlp.up_proj"),
    "gemma3": ("model.vision_tower.encoder.layers.1.self_attn.out_proj", None,
               "model.language_model.layers.0.mlp.gate_proj"),
}  # fmt: skip


@pytest.fixture(scope="module")
def dataset():
    return RenderedTranslationDataset(PAIRS, seed=0, size=(64, 32), font_size=(8, 14))


def _inputs(model, **kw):
    return VLMInputs(model, TOK, image_size=16, max_length=96, **kw)


# ---------------------------------------------------------------------------------------------------- parts


@pytest.mark.parametrize("arch", VLMS)
def test_parts_detected_on_real_module_names(arch):
    model = tiny_vlm(arch)
    targets = vlm_target_modules(model)
    names = {n for n, _ in model.named_modules()}
    for part, expected in zip(("vision", "projector", "language"), EXPECTED[arch]):
        if expected is None:
            assert targets[part] == []
        else:
            assert expected in names, f"{arch}: {expected} is not a module (transformers renamed it?)"
            assert expected in targets[part], (part, targets[part][:4])
    assert "lm_head" not in sum(targets.values(), [])
    assert "lm_head" in vlm_target_modules(model, include_output_layer=True)["language"]
    assert vlm_target_modules(model, "vision") == {"vision": targets["vision"]}
    roots = vlm_part_roots(model)
    assert roots["projector"] and roots["vision"]
    if arch == "gemma3":  # the projector is a bare matmul weight: train it whole through modules_to_save
        assert roots["projector"] == ["model.multi_modal_projector"]


@pytest.mark.parametrize(
    "name, part",
    [
        ("model.visual.deepstack_merger_list.0.linear_fc1", "projector"),  # Qwen3-VL
        ("model.connector.modality_projection.proj", "projector"),  # Idefics3 / SmolVLM
        ("qformer.encoder.layer.0.attention.attention.query", "projector"),  # BLIP-2
        ("language_projection", "projector"),
        ("model.multi_modal_projector.patch_merger.merging_layer", "projector"),  # Mistral 3
        ("model.vision_model.encoder.layers.0.mlp.fc1", "vision"),
        ("vision_model.vision_adapter.mlp.fc1", "vision"),  # Llama 4
        ("model.language_model.layers.0.mlp.up_proj", "language"),
        ("model.text_model.layers.0.self_attn.q_proj", "language"),
        ("lm_head", "language"),
    ],
)
def test_model_part_names_of_other_vlms(name, part):
    assert model_part(name) == part


def test_multihead_attention_out_proj_is_not_a_target():
    model = tiny_vlm("gemma3", vision_use_head=True)  # SigLIP pooling head: nn.MultiheadAttention
    names = {n for n, _ in model.named_modules()}
    out_proj = "model.vision_tower.head.attention.out_proj"
    assert out_proj in names
    assert out_proj not in vlm_target_modules(model)["vision"]
    with pytest.raises(ValueError, match="subset"):
        vlm_target_modules(model, ["vision", "audio"])


def test_vision_positions_all_count_even_when_patch_count_equals_text_length():
    out = torch.ones(2, 5, 3)
    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 0, 0]], dtype=torch.bool)
    assert _position_weights(out, mask)[1].tolist() == mask.reshape(-1).float().tolist()
    assert _position_weights(out, mask, per_token=False)[1].tolist() == [1.0] * 10


# ---------------------------------------------------------------------------------------------------- data


def test_rendering_is_deterministic_and_varied(dataset):
    a, b = dataset[1].image, RenderedTranslationDataset(PAIRS, seed=0, size=(64, 32), font_size=(8, 14))[1].image
    assert a.size == (64, 32) and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b))
    other = RenderedTranslationDataset(PAIRS, seed=1, size=(64, 32), font_size=(8, 14))[1].image
    assert not np.array_equal(np.asarray(a), np.asarray(other))
    backgrounds = {tuple(np.asarray(dataset[i].image)[0, 0]) for i in range(len(dataset))}
    assert len(backgrounds) > 1
    assert len(np.unique(np.asarray(a).reshape(-1, 3), axis=0)) > 2  # text was drawn
    image, src, tgt, group = dataset[2]
    assert (src, tgt, group) == ("In the beginning", "Im Anfang", "en-de")
    assert dataset[-1].src == PAIRS[-1].src
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_wrap_and_font_fallback(monkeypatch):
    fonts = find_fonts("Hello")
    font = images._load_font(fonts[0] if fonts else None, 12)
    lines = wrap_text("a fairly long sentence that must wrap over several lines", font, 60)
    assert len(lines) > 2 and all(images._text_width(font, ln) <= 60 or " " not in ln for ln in lines)
    assert "".join(wrap_text("abcdefghij", font, 20)) == "abcdefghij"  # no spaces: breaks by character
    monkeypatch.setattr(images, "font_dirs", lambda: [])
    with pytest.warns(UserWarning, match="no font file found"):
        img = render_text_image("Hello world", seed=3, size=(64, 32))
    assert len(np.unique(np.asarray(img).reshape(-1, 3), axis=0)) > 2


def test_font_coverage_for_devanagari():
    hindi = "आदि में परमेश्वर ने"
    covering = find_fonts(hindi)
    for path in covering:  # with fonts-noto-core: NotoSans/SerifDevanagari; without: none, and rendering warns
        assert {ord(c) for c in hindi if not c.isspace()} <= images._cmap(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img = render_text_image(hindi, seed=0, size=(96, 48))
    assert img.size == (96, 48)


def test_user_dataset_rows(tmp_path):
    path = tmp_path / "x.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(path)
    arr = np.zeros((8, 8, 3), dtype=np.uint8)
    ds = ImageTranslationDataset([
        (str(path), "Hello", "Bonjour", "en-fr"),
        {"image": arr, "src": "Hi", "tgt": "Salut", "group": "news", "src_lang": "en", "tgt_lang": "fr"},
        {"image": Image.new("L", (4, 4)), "src": "a", "tgt": "b", "group": "en-de"},
    ])  # fmt: skip
    first = ds[0]
    assert first.image.getpixel((0, 0)) == (255, 0, 0) and (first.src_lang, first.tgt_lang) == ("en", "fr")
    assert (ds[1].group, ds[1].src_lang, ds[1].tgt_lang) == ("news", "en", "fr")
    assert ds[2].image.mode == "RGB"
    assert [ex.tgt for ex in ds] == ["Bonjour", "Salut", "b"]
    with pytest.raises(ValueError, match="missing key"):
        ImageTranslationDataset([{"image": arr, "src": "a"}])[0]
    with pytest.raises(ValueError, match="'tgt' must be a non-empty"):
        ImageTranslationDataset([(arr, "a", " ", "en-fr")])[0]
    with pytest.raises(FileNotFoundError):
        ImageTranslationDataset([(str(tmp_path / "nope.png"), "a", "b", "en-fr")])[0]
    with pytest.raises(ValueError, match="unknown languages"):
        _inputs(tiny_vlm("llava")).encode_example(ImageTranslationDataset([(arr, "a", "b", "misc")])[0])


# ---------------------------------------------------------------------------------------------------- batches


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl", "gemma3"])
def test_encoding_masks_prompt_and_image_tokens(arch, dataset):
    model = tiny_vlm(arch)
    inputs = _inputs(model)
    ex = dataset[0]
    ocr, tr = (inputs.encode_example(ex, t) for t in ("ocr", "translate"))
    for feat, answer in ((ocr, ex.src), (tr, ex.tgt)):
        ids, labels = feat["input_ids"], feat["labels"]
        answer_ids = [t for t in labels if t != IGNORE_INDEX]
        assert TOK.decode(answer_ids[:-1]) == " " + answer and answer_ids[-1] == TOK.eos_token_id
        assert labels[: len(ids) - len(answer_ids)] == [IGNORE_INDEX] * (len(ids) - len(answer_ids))
        assert ids[0] == TOK.bos_token_id
    n_image = ocr["input_ids"].count(inputs.image_token_id)
    if arch == "qwen2_vl":
        assert n_image == int(ocr["image_grid_thw"].prod()) // 4 and ocr["mm_token_type_ids"].count(1) == n_image
    elif arch == "gemma3":
        assert n_image == 4 and ocr["token_type_ids"].count(1) == 4
    else:
        assert n_image == 4  # (16 / 8) ** 2 patches
    assert OCR_PROMPT in TOK.decode(ocr["input_ids"], skip_special_tokens=True)
    assert "from English into French. French:" in TOK.decode(tr["input_ids"], skip_special_tokens=True)
    batch = inputs.collate([ocr, tr])
    assert batch["neuron_groups"] == ["en-fr", "en-fr"]
    out = model(**{k: v for k, v in batch.items() if k != "neuron_groups"})
    assert torch.isfinite(out.loss)
    short = VLMInputs(model, TOK, image_size=16, max_length=len(ocr["input_ids"]) - 3).encode_example(ex, "ocr")
    assert short["input_ids"].count(inputs.image_token_id) == n_image and short["labels"][-1] != TOK.eos_token_id
    with pytest.raises(ValueError, match="no room for an answer"):
        VLMInputs(model, TOK, image_size=16, max_length=n_image).encode_example(ex, "ocr")


def test_processor_path_matches_direct_path(dataset):
    from transformers import CLIPImageProcessor, LlavaProcessor

    model = tiny_vlm("llava")
    image_processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=TOK,
        patch_size=8,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
    )  # fmt: skip (CLIP CLS)
    via_proc = VLMInputs(model, processor=processor, max_length=96).encode_example(dataset[1], "translate")
    direct = _inputs(model).encode_example(dataset[1], "translate")
    assert via_proc["input_ids"] == direct["input_ids"] and via_proc["labels"] == direct["labels"]
    assert torch.equal(via_proc["pixel_values"], direct["pixel_values"])
    processor.chat_template = (
        "{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
        "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %} ASSISTANT:"
        "{% endif %}"
    )
    chat = VLMInputs(model, processor=processor, max_length=96).encode_example(dataset[1], "ocr")
    prompt = [t for t, lab in zip(chat["input_ids"], chat["labels"]) if lab == IGNORE_INDEX]
    assert TOK.decode(prompt, skip_special_tokens=True).endswith(f"USER: \n{OCR_PROMPT} ASSISTANT:")
    answer = [t for t in chat["labels"] if t != IGNORE_INDEX]
    assert TOK.decode(answer, skip_special_tokens=True) == dataset[1].src
    batch = VLMInputs(model, processor=processor).prompt_batch([dataset[0].image] * 2, ["a", "longer prompt"])
    assert batch["attention_mask"][0, 0] == 0 and batch["input_ids"].shape[0] == 2 and "labels" not in batch
    with pytest.raises(NotImplementedError, match="processor"):
        VLMInputs(torch.nn.Linear(2, 2), TOK)


# ---------------------------------------------------------------------------------------------------- selection


def _kept_per_part(selection):
    kept = {}
    for name in selection.kept_layers:
        kept[model_part(name)] = kept.get(model_part(name), 0) + 1
    return kept


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl", "gemma3"])
def test_selection_budgets_each_part(arch, dataset):
    model = tiny_vlm(arch)
    targets = vlm_target_modules(model)
    calib = vlm_calibration_batches(_inputs(model), dataset, batch_size=2)
    assert sorted(calib) == ["en-de", "en-fr"] and len(calib["en-fr"]) == 2  # 2 examples x 2 tasks
    ratios = {"vision": 0.25, "projector": 0.5, "language": 0.5}
    sel = select_vlm_neurons(model, calib, layer_ratio=ratios, neuron_ratio=0.5, specific_ratio=0.25,
                             row_selection="layers", progress=False)  # fmt: skip
    kept = _kept_per_part(sel)
    for part, ratio in ratios.items():
        n = len(targets[part])
        assert kept.get(part, 0) == (max(1, round(ratio * n)) if n else 0), (part, kept)
    rows_parts = {model_part(n) for n in sel.neurons} | {
        model_part(n) for g in sel.language_neurons.values() for n in g
    }
    assert rows_parts == ({"vision", "language"} if arch == "gemma3" else {"vision", "projector", "language"})
    for name in sel.kept_layers:  # vision and projector layers saw the images: non-zero scores
        assert float(sel.neuron_scores[name].sum()) > 0, name
    specific = {model_part(n) for g in sel.language_neurons.values() for n in g}
    assert specific == rows_parts  # Qwen2-VL's packed patches are routed too (test_packed_patch_routing_...)
    assert packs_patches(model) == (arch == "qwen2_vl")
    shared = select_vlm_neurons(model, calib, layer_ratio=ratios, neuron_ratio=0.5, specific_ratio=0.25,
                                row_selection="layers", specific_parts=None, progress=False)  # fmt: skip
    assert shared.language_neurons == {} and shared.kept_layers == sel.kept_layers

    def rows(s, name):
        return sorted(s.neurons.get(name, []) + [r for g in s.language_neurons.values() for r in g.get(name, [])])

    assert all(rows(shared, n) == rows(sel, n) for n in sel.kept_layers)  # same rows, only ownership differs
    with pytest.raises(TypeError, match="target_modules"):
        select_vlm_neurons(model, calib, target_modules="all-linear")


# ---------------------------------------------------------------------------------------------------- adapter


def _randomise_deltas(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "neuron_select_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_routing_save_load_merge_on_llava(dataset, tmp_path):
    model = tiny_vlm("llava")
    inputs = _inputs(model)
    calib = vlm_calibration_batches(inputs, dataset, batch_size=2)
    sel = select_vlm_neurons(model, calib, layer_ratio={"vision": 0.5, "projector": 1.0, "language": 0.5},
                             neuron_ratio=0.5, specific_ratio=0.5, progress=False)  # fmt: skip
    pm = peft.get_peft_model(model, sel.to_config(model=model))
    batch = inputs.collate(vlm_features(inputs, [dataset[2], dataset[3]]))  # en-de only
    assert set(batch["neuron_groups"]) == {"en-de"}
    pm.train()
    pm(**batch).loss.backward()
    layers = {n[len("base_model.model.") :]: m for n, m in pm.named_modules() if isinstance(m, neuron_peft.Linear)}
    groups = pm.peft_config["default"].groups
    agnostic, owned = {}, {"en-fr": 0.0, "en-de": 0.0}
    for name, layer in layers.items():
        grad = layer.neuron_select_delta["default"].grad.abs().sum(dim=1)  # per selected row
        row_groups = layer.neuron_select_row_groups["default"]
        part = model_part(name)
        agnostic[part] = agnostic.get(part, 0.0) + float(grad[row_groups < 0].sum())
        for g, group in enumerate(groups):
            owned[group] += float(grad[row_groups == g].sum())
    assert set(agnostic) == {"vision", "projector", "language"} and all(v > 0 for v in agnostic.values())
    assert owned["en-fr"] == 0.0 and owned["en-de"] > 0, owned  # en-fr rows do not learn from en-de samples
    pm.zero_grad()

    _randomise_deltas(pm)
    pm.eval()
    eval_batch = {k: v for k, v in batch.items() if k != "neuron_groups"}
    with torch.no_grad():
        ref = pm(**eval_batch).logits
        base = pm.get_base_model()
        with pm.disable_adapter():
            plain = pm(**eval_batch).logits
    assert not torch.allclose(ref, plain)
    pm.save_pretrained(tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(tiny_vlm("llava"), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**eval_batch).logits, ref)
        merged = loaded.merge_and_unload()
        assert type(merged) is type(base)
        torch.testing.assert_close(merged(**eval_batch).logits, ref, rtol=1e-4, atol=1e-5)


def test_gemma3_projector_trains_whole_through_modules_to_save(dataset, tmp_path):
    model = tiny_vlm("gemma3")
    inputs = _inputs(model)
    calib = vlm_calibration_batches(inputs, [dataset[0], dataset[2]], batch_size=2)
    sel = select_vlm_neurons(model, calib, layer_ratio=0.5, neuron_ratio=0.5, progress=False)
    cfg = sel.to_config(model=model, modules_to_save=vlm_part_roots(model)["projector"])
    pm = peft.get_peft_model(model, cfg)
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert any("multi_modal_projector" in n and "mm_input_projection_weight" in n for n in trainable)
    batch = inputs.collate(vlm_features(inputs, [dataset[0], dataset[2]]))
    pm.train()
    pm(**batch).loss.backward()
    proj = [p for n, p in pm.named_parameters() if p.requires_grad and "mm_input_projection_weight" in n]
    assert proj and float(proj[0].grad.abs().sum()) > 0


def test_training_on_rendered_images_reduces_loss(dataset):
    from neuron_peft.training import train_loop

    model = tiny_vlm("qwen2_vl")
    inputs = _inputs(model)
    calib = vlm_calibration_batches(inputs, dataset, batch_size=2)
    sel = select_vlm_neurons(model, calib, layer_ratio={"vision": 0.5, "projector": 1.0, "language": 1.0},
                             neuron_ratio=0.5, specific_ratio=0.2, progress=False)  # fmt: skip
    pm = peft.get_peft_model(model, sel.to_config(model=model))
    feats = vlm_features(inputs, dataset)
    loader = torch.utils.data.DataLoader(feats, batch_size=8, shuffle=False, collate_fn=inputs.collate)

    def mean_loss():
        pm.eval()
        with torch.no_grad():
            return sum(float(pm(**b).loss) for b in loader) / len(loader)

    vision_rows = [p for n, p in pm.named_parameters() if "neuron_select_delta" in n and "visual.blocks" in n]
    assert vision_rows and all(float(p.detach().abs().sum()) == 0 for p in vision_rows)
    before = mean_loss()
    losses = train_loop(pm, loader, steps=8, lr=3e-2, warmup_ratio=0.05, progress=False)
    after = mean_loss()
    assert len(losses) == 8 and after < before - 0.1, (before, after, losses)
    assert all(float(p.detach().abs().sum()) > 0 for p in vision_rows)  # the vision tower's rows trained too


# ------------------------------------------------------------------------------------- packed-patch routing
@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_packed_patch_routing_matches_dense_reference(arch, dataset):
    """Qwen2-VL / Qwen2.5-VL run every image's patches packed into one (patches, dim) tensor. In a mixed-language
    batch, each vision / merger row must get exactly the gradient that a dense computation gives from the patches
    of the samples allowed to update it (its own language's, or all for agnostic rows)."""
    import copy

    model = tiny_vlm(arch)
    reference = copy.deepcopy(model)
    inputs = _inputs(model)
    calib = vlm_calibration_batches(inputs, dataset, batch_size=2)
    sel = select_vlm_neurons(model, calib, layer_ratio=1.0, neuron_ratio=0.5, specific_ratio=0.5, progress=False)
    specific_vision = {n for g in sel.language_neurons.values() for n in g if model_part(n) != "language"}
    assert specific_vision, "the selection should own vision rows per language"
    pm = peft.get_peft_model(model, sel.to_config(model=model, train_bias=True))
    batch = inputs.collate(vlm_features(inputs, [dataset[0], dataset[2], dataset[1], dataset[3]]))
    groups = list(batch["neuron_groups"])
    assert len(set(groups)) == 2
    grid = batch["image_grid_thw"]
    assert grid.shape[0] == len(groups) and bool((grid == grid[0]).all())  # one same-size image per sample
    patches = int(grid[0].prod())

    # dense reference: inputs and output gradients of the plain model's vision Linear layers
    captured = {}

    def capture(name):
        def hook(module, args, out):
            out.retain_grad()
            captured[name] = (args[0].detach(), out)

        return hook

    ref_modules = dict(reference.named_modules())
    names = [n for n in sel.kept_layers if model_part(n) != "language"]
    handles = [ref_modules[n].register_forward_hook(capture(n)) for n in names]
    plain = {k: v for k, v in batch.items() if k != "neuron_groups"}
    reference(**plain).loss.backward()
    for h in handles:
        h.remove()

    pm.train()
    pm(**batch).loss.backward()
    layers = {n[len("base_model.model.") :]: m for n, m in pm.named_modules() if isinstance(m, neuron_peft.Linear)}
    adapter_groups = pm.peft_config["default"].groups
    checked_specific = 0
    for name in names:
        x, out = captured[name]
        assert x.dim() == 2, (name, x.shape)  # packed: no sample axis
        per_image = patches if x.shape[0] == patches * len(groups) else patches // 4
        assert x.shape[0] == per_image * len(groups), (name, x.shape)
        sample = torch.arange(len(groups)).repeat_interleave(per_image)  # images are packed in batch order
        layer = layers[name]
        rows = layer.neuron_select_indices["default"]
        owners = layer.neuron_select_row_groups["default"]
        grad = layer.neuron_select_delta["default"].grad
        bias_grad = layer.neuron_select_bias_delta["default"].grad
        for j, (r, owner) in enumerate(zip(rows.tolist(), owners.tolist())):
            if owner < 0:
                keep = torch.ones(len(groups), dtype=torch.bool)
            else:
                keep = torch.tensor([g == adapter_groups[owner] for g in groups])
                checked_specific += 1
            m = keep[sample].to(x.dtype).unsqueeze(1)
            g = out.grad[:, r : r + 1] * m
            torch.testing.assert_close(grad[j], (g * x).sum(0), rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(bias_grad[j], g.sum(), rtol=1e-4, atol=1e-6)
    assert checked_specific > 0


def test_packed_patch_samples_assigns_images_to_samples():
    from types import SimpleNamespace

    cfg = SimpleNamespace(image_token_id=9, video_token_id=8, vision_config=SimpleNamespace(spatial_merge_size=2))
    # sample 0: no image; sample 1: two images (4 + 2 merged tokens); sample 2: one image (4 merged tokens)
    ids = torch.tensor([[1, 2, 3, 0, 0, 0, 0, 0], [9, 9, 9, 9, 9, 9, 5, 0], [9, 9, 9, 9, 1, 1, 1, 1]])
    grid = torch.tensor([[1, 4, 4], [1, 2, 4], [1, 4, 4]])  # 16, 8, 16 patches -> 4, 2, 4 merged tokens
    out = packed_patch_samples(cfg, ids, grid, n_samples=3)
    assert out[40].tolist() == [1] * 16 + [1] * 8 + [2] * 16
    assert out[10].tolist() == [1] * 4 + [1] * 2 + [2] * 4
    assert packed_patch_samples(cfg, ids, grid[:2], n_samples=3) == {}  # tokens without images
    assert packed_patch_samples(cfg, None, grid) == {}  # inputs_embeds: cannot map
    assert packed_patch_samples(cfg, ids, grid, n_samples=2) == {}  # groups do not match the batch
