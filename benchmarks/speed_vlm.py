"""Training-step time and peak memory on a vision-language model: NeuronSelect vs LoRA vs full fine-tuning.

Every method gets the same LLaVA-style model (CLIP vision tower + 2-layer MLP projector + Llama language model,
rebuilt from its config with a fixed seed), the same batch of rendered sentence images with OCR and translation
instructions (labels on the answers only, built by `neuron_peft.multimodal.VLMInputs`), the Linear layers of all
three parts as targets (`vlm_target_modules`), and AdamW. Timing is interleaved over rounds (round-robin, order
rotated) and the median is reported; peak memory is a separate pass per method (CUDA: max_memory_allocated over
the second step; CPU: torch.profiler allocation events replayed; both in ``benchmarks/common/timing.py``).

Methods: ``neuron-10`` / ``neuron-40`` (10% / 40% of the rows of every targeted layer, random rows),
``neuron-sel`` (rows chosen by `select_vlm_neurons` on the batch: vision 25%, projector 100%, language 40% of the
layers, half their rows), ``lora`` (r=16 on the same layers), ``full``.

Usage::

    python benchmarks/speed_vlm.py --preset cpu                   # ~40M LLaVA-style, fp32, 2 threads
    python benchmarks/speed_vlm.py --preset gpu --json out.json   # ~1.6B (CLIP-L/336 + 1.2B Llama), bf16
    python benchmarks/speed_vlm.py --model /path/to/hf-vlm-folder --device cuda --dtype bfloat16

``--model`` takes any local Hugging Face VLM folder (``AutoModelForImageTextToText`` + ``AutoProcessor``, loaded
with ``local_files_only=True``); its processor builds the batch. Image-translation *quality* needs a pretrained
VLM and is not measured here.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/, for the shared set-up in common/
from common.machine import MiB, speed_machine_info  # noqa: E402
from common.timing import peak_bytes, release, resolve_preset, sync, timed  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

from neuron_peft import NeuronSelectConfig  # noqa: E402
from neuron_peft.data import ParallelExample  # noqa: E402
from neuron_peft.fileio import OutputPathError, atomic_write_json, check_output_file  # noqa: E402
from neuron_peft.multimodal import (  # noqa: E402
    RenderedTranslationDataset,
    VLMInputs,
    char_tokenizer,
    flatten_targets,
    select_vlm_neurons,
    vlm_calibration_batches,
    vlm_features,
    vlm_target_modules,
)

METHODS = ["neuron-10", "neuron-40", "neuron-sel", "lora", "full"]
SENTENCES = [
    ("In the beginning God created the heaven and the earth.", "Au commencement, Dieu crea les cieux et la terre.", "fr"),
    ("And God said, Let there be light: and there was light.", "Und Gott sprach: Es werde Licht! Und es ward Licht.", "de"),
    ("And God saw the light, that it was good.", "Dieu vit que la lumiere etait bonne.", "fr"),
    ("And the evening and the morning were the first day.", "Da ward aus Abend und Morgen der erste Tag.", "de"),
]  # fmt: skip


@dataclass
class Preset:
    vision: dict
    text: dict
    batch: int  # examples; each gives an OCR and a translation sample, so 2 * batch sequences
    device: str
    dtype: torch.dtype
    threads: Optional[int] = None
    rounds: int = 5
    warmup: int = 1


PRESETS = {
    # ~40M: CLIP 256-wide x 4 layers on 112px/14 (64 patches) + Llama 512-wide x 8 layers
    "cpu": Preset(
        vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                    image_size=112, patch_size=14),
        text=dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=8, vocab_size=8000),
        batch=4, device="cpu", dtype=torch.float32, threads=2, rounds=5,
    ),
    # ~1.6B: CLIP ViT-L/14-336 shapes (576 patches) + a 1.2B Llama (2048 x 16)
    "gpu": Preset(
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=336, patch_size=14),
        text=dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=32000),
        batch=8, device="cuda", dtype=torch.bfloat16, rounds=7, warmup=3,
    ),
    "tiny": Preset(
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
                    patch_size=14),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256),
        batch=2, device="cpu", dtype=torch.float32, threads=2, rounds=1,
    ),
}  # fmt: skip


# ---------------------------------------------------------------------------------------------- model and batch


class Source:
    """Builds the same base model every time and the batch (from a preset config or a local HF folder)."""

    def __init__(self, preset: Preset, model_path: Optional[str] = None):
        self.preset, self.model_path = preset, model_path
        if model_path:
            from transformers import AutoProcessor

            self.processor = AutoProcessor.from_pretrained(model_path, local_files_only=True)
            self.tokenizer = None
        else:
            self.processor = None
            self.tokenizer = char_tokenizer(["<image>"])  # <image> = 4

    def build(self, seed: int = 0):
        p = self.preset
        if self.model_path:
            from transformers import AutoModelForImageTextToText

            model = AutoModelForImageTextToText.from_pretrained(
                self.model_path, local_files_only=True, dtype=p.dtype, device_map=p.device
            )
            return model.train()
        from transformers import LlavaConfig, LlavaForConditionalGeneration

        cfg = LlavaConfig(
            vision_config=dict(model_type="clip_vision_model", projection_dim=p.text["hidden_size"], **p.vision),
            text_config=dict(model_type="llama", max_position_embeddings=4096, **p.text),
            image_token_id=4, vision_feature_layer=-2,
        )  # fmt: skip
        torch.manual_seed(seed)
        with torch.device(p.device):
            model = LlavaForConditionalGeneration(cfg)
        model.config.use_cache = False
        return model.to(p.dtype).train()

    def batch(self, model) -> tuple[dict, VLMInputs, list]:
        p = self.preset
        examples = [ParallelExample(s, t, f"en-{lang}", "en", lang) for s, t, lang in SENTENCES]
        examples = (examples * (p.batch // len(examples) + 1))[: p.batch]
        if self.processor is not None:
            inputs = VLMInputs(model, processor=self.processor, max_length=4096)
        else:
            inputs = VLMInputs(model, self.tokenizer, max_length=4096)
        size = p.vision["image_size"] if not self.processor else 448
        data = [ex for ex in RenderedTranslationDataset(examples, seed=0, size=(size, size))]
        batch = inputs.collate(vlm_features(inputs, data))
        batch = {k: (v.to(p.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        return batch, inputs, data


# ---------------------------------------------------------------------------------------------- methods


def _selection_config(source: Source, model, inputs, data):
    calib = vlm_calibration_batches(inputs, data, batch_size=max(1, len(data)))
    calib = {g: [{k: (v.to(source.preset.device) if torch.is_tensor(v) else v) for k, v in b.items()} for b in bs]
             for g, bs in calib.items()}  # fmt: skip
    sel = select_vlm_neurons(model, calib, layer_ratio={"vision": 0.25, "projector": 1.0, "language": 0.4},
                             neuron_ratio=0.5, specific_ratio=0.1, row_selection="layers", progress=False)  # fmt: skip
    return sel.to_config(model=model)


def make(name: str, source: Source, inputs=None, data=None) -> tuple[torch.nn.Module, int]:
    base = source.build()
    targets = flatten_targets(vlm_target_modules(base))
    if name.startswith("neuron-") and name != "neuron-sel":
        cfg = NeuronSelectConfig(target_modules=targets, neuron_ratio=int(name.split("-")[1]) / 100,
                                 neuron_init="random")  # fmt: skip
        model = get_peft_model(base, cfg)
    elif name == "neuron-sel":
        model = get_peft_model(base, _selection_config(source, base, inputs, data))
    elif name == "lora":
        model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    elif name == "full":
        model = base
    else:
        raise SystemExit(f"unknown method {name!r}; choose from {METHODS}")
    return model.train(), sum(p.numel() for p in model.parameters() if p.requires_grad)


def stepper(model, batch, name: str) -> Callable[[], None]:
    if name != "neuron-sel":  # only the selection has language groups to route
        batch = {k: v for k, v in batch.items() if k != "neuron_groups"}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step():
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def peak_memory(name: str, source: Source, batch, inputs, data) -> float:
    """MiB at the peak of one training step of `name` (second step), nothing else of it alive."""
    return peak_bytes(lambda: stepper(make(name, source, inputs, data)[0], batch, name), source.preset.device) / MiB


# ---------------------------------------------------------------------------------------------- main


def main(argv=None, log=print) -> Optional[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--model", help="local Hugging Face VLM folder (instead of the preset's config-built model)")
    ap.add_argument("--device", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", choices=["float32", "bfloat16"])
    ap.add_argument("--methods", help=f"comma-separated subset of {','.join(METHODS)}")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    args = ap.parse_args(argv)
    try:  # before any timing: never write over the model folder or another run's results by accident
        if args.json:
            check_output_file(args.json, inputs=[("--model", args.model)], overwrite=args.overwrite, flag="--json")
    except OutputPathError as err:
        ap.error(str(err))
    preset = resolve_preset(PRESETS, args, log)
    if preset is None:
        return None
    methods = args.methods.split(",") if args.methods else list(METHODS)
    rounds = args.rounds or preset.rounds

    source = Source(preset, args.model)
    probe = source.build()
    batch, inputs, data = source.batch(probe)
    targets = vlm_target_modules(probe)
    n_params = sum(p.numel() for p in probe.parameters())
    del probe
    release(preset.device)
    seq = tuple(batch["input_ids"].shape)
    info = speed_machine_info(preset.device)
    log(
        f"model: {args.model or 'preset ' + args.preset} ({n_params / 1e6:.1f}M params), {preset.device} {preset.dtype}"
    )
    log(f"targets per part: { {p: len(v) for p, v in targets.items()} }; batch input_ids {seq}, "
        f"pixel_values {tuple(batch['pixel_values'].shape)}, loss tokens {int((batch['labels'] != -100).sum())}")  # fmt: skip
    log(f"machine: {info}")

    results = {"preset": args.preset, "model": args.model, "params": n_params, "device": preset.device,
               "dtype": str(preset.dtype), "batch_shape": seq, "targets": {p: len(v) for p, v in targets.items()},
               "machine": info, "rounds": rounds, "argv": sys.argv if argv is None else list(argv),
               "methods": {}}  # fmt: skip
    peaks = {}
    if not args.no_memory:
        for m in methods:
            peaks[m] = peak_memory(m, source, batch, inputs, data)
            log(f"  peak {m}: {peaks[m]:.1f} MiB")
    runners = {}
    for m in methods:
        model, trainable = make(m, source, inputs, data)
        runners[m] = (model, trainable, stepper(model, batch, m), [])
        for _ in range(preset.warmup):
            runners[m][2]()
    sync(preset.device)
    for rnd in range(rounds):
        for m in methods[rnd % len(methods) :] + methods[: rnd % len(methods)]:
            runners[m][3].append(timed(runners[m][2], preset.device)[0])
        log(f"  round {rnd + 1}/{rounds}: " + ", ".join(f"{m} {1e3 * runners[m][3][-1]:.0f}" for m in methods))
    lora = statistics.median(runners["lora"][3]) if "lora" in runners else None
    lines = ["| method | trainable | ms/step (median) | x LoRA | min ms | peak MiB | mem x LoRA |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for m in methods:
        _, trainable, _, times = runners[m]
        med = statistics.median(times)
        results["methods"][m] = {"trainable": trainable, "ms_median": 1e3 * med, "ms_min": 1e3 * min(times),
                                 "ms_all": [1e3 * t for t in times], "peak_mib": peaks.get(m)}  # fmt: skip
        x = f"{med / lora:.2f}" if lora else "-"
        pk = peaks.get(m)
        xm = f"{pk / peaks['lora']:.2f}" if pk and peaks.get("lora") else "-"
        lines.append(f"| {m} | {trainable:,} | {1e3 * med:.1f} | {x} | {1e3 * min(times):.1f} | "
                     f"{'-' if pk is None else f'{pk:.1f}'} | {xm} |")  # fmt: skip
    results["machine"]["loadavg_end"] = speed_machine_info(preset.device).get("loadavg")
    log("")
    log("\n".join(lines))
    if args.json:
        atomic_write_json(args.json, results, indent=2, default=str)
        log(f"wrote {args.json}")
    del runners
    gc.collect()
    return results


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"({time.perf_counter() - t0:.0f} s)")
