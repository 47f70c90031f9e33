"""Training-step time and peak memory: NeuronSelect vs LoRA, DoRA, full fine-tuning and the backward "floor".

One command, one process. Every method gets the same Llama-style model (rebuilt from a LlamaConfig with a fixed
seed), the same batch, the same seven targeted projections and AdamW. Step time is measured in interleaved rounds
(round-robin over the methods, the order rotated every round) so that drift of a shared or throttled machine hits
every method alike; the reported number is the median over all rounds.

Step = forward + loss + backward + AdamW step + zero_grad. The "floor" is the frozen model with gradients flowing
only to ``inputs_embeds``: the cheapest backward any adapter can have (no weight gradient at all, no optimizer).

Peak memory is measured in a separate, untimed pass per method, with nothing else of that method alive:
  * CUDA: ``torch.cuda.max_memory_allocated`` over the second training step (peak stats reset after the first, so
    AdamW state exists), with only that method's model on the device.
  * CPU: there is no allocator peak counter, so the pass runs under ``torch.profiler`` with ``profile_memory=True``
    from an empty start (model built, optimizer created, two steps) and replays every allocation/free event in
    time order; the peak of live bytes during the second step is the method's peak (weights + optimizer state +
    gradients + activations + any copies the method keeps).

Column units (``--columns``, issue 26): random input channels of ``o_proj`` / ``down_proj`` ("channel-*") and random
MLP neurons (``gate_proj`` / ``up_proj`` row j + ``down_proj`` column j, "mlp-neuron-*"), each at LoRA r16's
trainable count ("-lora") and at neuron-10's ("-10"), the same share of every projection or block.

Inference overhead: forward-only (``torch.no_grad``, eval mode) time of the base model vs NeuronSelect 10%
unmerged and vs NeuronSelect 10% after ``merge_adapter()``, also interleaved.

Where things are: timing a step, the peak-memory pass and the machine record are in ``common/timing.py`` and
``common/machine.py`` (shared with speed_vlm.py); the tables and targets in ``reports/speed.py``; this file holds the
presets, the methods and the timing loops.

Usage::

    python benchmarks/speed.py --preset cpu                 # ~34M Llama, fp32, 8x128 tokens, 2 threads
    python benchmarks/speed.py --preset gpu-1b --json out.json
    python benchmarks/speed.py --preset cpu --methods neuron-10,lora,floor --rounds 3
    python benchmarks/speed.py --preset cpu --columns --dtype bfloat16         # + the column units
"""

from __future__ import annotations

import argparse
import copy
import functools
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, for common/ and reports/
from common.machine import MiB, speed_machine_info  # noqa: E402
from common.timing import peak_bytes, release, resolve_preset, sync, timed  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from reports.speed import log_report, targets  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from neuron_peft import NeuronSelectConfig  # noqa: E402
from neuron_peft.fileio import OutputPathError, atomic_write_json, check_output_file  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ["neuron-10", "neuron-40", "neuron-100", "lora", "dora", "full", "floor"]


@dataclass
class Preset:
    model: dict
    batch: int
    seq: int
    device: str
    dtype: torch.dtype
    threads: Optional[int] = None
    rounds: int = 5
    warmup: int = 1
    steps: int = 1  # timed steps per method per round
    infer_steps: int = 2


PRESETS = {
    # ~33.5M params (25.3M in the targeted projections, 8.2M in untied embeddings/head)
    "cpu": Preset(
        model=dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                   num_key_value_heads=8, vocab_size=8000),
        batch=8, seq=128, device="cpu", dtype=torch.float32, threads=2, rounds=5, warmup=1, steps=1,
    ),
    # ~1.0B, TinyLlama-like shapes with 20 layers
    "gpu-1b": Preset(
        model=dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=20, num_attention_heads=32,
                   num_key_value_heads=4, vocab_size=32000),
        batch=8, seq=512, device="cuda", dtype=torch.bfloat16, rounds=7, warmup=3, steps=3, infer_steps=5,
    ),
    # ~3.2B, Llama-3.2-3B shapes (tied embeddings)
    "gpu-3b": Preset(
        model=dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                   num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
        batch=4, seq=1024, device="cuda", dtype=torch.bfloat16, rounds=7, warmup=3, steps=3, infer_steps=5,
    ),
    # for the smoke test only
    "tiny": Preset(
        model=dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=256),
        batch=2, seq=16, device="cpu", dtype=torch.float32, threads=2, rounds=1, warmup=1, steps=1,
    ),
}  # fmt: skip


# ---------------------------------------------------------------------------------------------- models


def build_base(preset: Preset, seed: int = 0) -> LlamaForCausalLM:
    """The same base model every time: fixed seed, built directly on the target device."""
    cfg = LlamaConfig(**preset.model, max_position_embeddings=max(preset.seq, 128), use_cache=False)
    torch.manual_seed(seed)
    with torch.device(preset.device):
        model = LlamaForCausalLM(cfg)
    return model.to(preset.dtype).train()


def _neuron(ratio: float, update_path: Optional[str] = None) -> Callable:
    def make(base):
        extra = {} if update_path is None else {"update_path": update_path}
        try:
            cfg = NeuronSelectConfig(target_modules=list(TARGETS), neuron_ratio=ratio, neuron_init="random", **extra)
        except TypeError as err:  # older library without the field
            raise SystemExit(f"this neuron_peft has no NeuronSelectConfig(update_path=...): {err}") from None
        return get_peft_model(base, cfg)

    return make


ROUTING_GROUPS = ("fr", "de", "hi", "tr")


def _neuron_routed(ratio: float, specific: float = 0.1) -> Callable:
    """Same number of rows as `_neuron(ratio)`, a `specific` share of them owned by 4 language groups (1:9)."""

    def make(base):
        gen = torch.Generator().manual_seed(0)
        neurons, language = {}, {g: {} for g in ROUTING_GROUPS}
        for name, module in base.named_modules():
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
                n = module.out_features
                picked = torch.randperm(n, generator=gen)[: max(1, round(ratio * n))].tolist()
                n_spec = max(len(ROUTING_GROUPS), round(specific * len(picked)))
                neurons[name] = picked[n_spec:]
                for i, g in enumerate(ROUTING_GROUPS):
                    language[g][name] = picked[i : n_spec : len(ROUTING_GROUPS)]
        cfg = NeuronSelectConfig(target_modules=list(TARGETS), neurons=neurons, language_neurons=language)
        return get_peft_model(base, cfg)

    return make


OUTPUT_PROJECTIONS = ("o_proj", "down_proj")


def _trainable_of(method: str, base) -> int:
    """Trainable parameters `method` has when built on ``base`` (which it adapts in place)."""
    model = BUILDERS[method](base)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _columns(match: str, mlp_neuron: bool = False) -> Callable:
    """Random column units at the trainable count of ``match`` (``"lora"``: LoRA r16; ``"neuron-10"``): the same
    share of every output projection's input channels (``o_proj``, ``down_proj``; a column holds out_features
    weights), or with ``mlp_neuron`` the same share of every MLP block's neurons (``gate_proj`` / ``up_proj`` row j
    and ``down_proj`` column j). Random like S2FT's choice; which units are picked does not change the step cost."""

    def make(base):
        budget = _trainable_of(match, copy.deepcopy(base))  # the count a column method is matched to
        gen = torch.Generator().manual_seed(0)
        modules = [(n, m) for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)]
        writers = [(n, m) for n, m in modules if n.rsplit(".", 1)[-1] in (("down_proj",) if mlp_neuron
                                                                         else OUTPUT_PROJECTIONS)]  # fmt: skip
        by_name = dict(modules)
        if mlp_neuron:  # neuron j: down column j (out weights) + gate and up row j (in weights each)
            cost = {
                n: m.out_features + 2 * by_name[n.replace("down_proj", "gate_proj")].in_features for n, m in writers
            }
        else:
            cost = {n: m.out_features for n, m in writers}
        total = sum(cost[n] * m.in_features for n, m in writers)
        if budget > total:
            raise SystemExit(f"{match}'s {budget:,} trainable parameters exceed every column unit ({total:,})")
        share = budget / total
        columns, rows = {}, {}
        for n, m in writers:
            k = max(1, round(share * m.in_features))
            columns[n] = sorted(torch.randperm(m.in_features, generator=gen)[:k].tolist())
            if mlp_neuron:
                for reader in ("gate_proj", "up_proj"):
                    rows[n.replace("down_proj", reader)] = columns[n]
        targets = ["gate_proj", "up_proj", "down_proj"] if mlp_neuron else list(OUTPUT_PROJECTIONS)
        cfg = NeuronSelectConfig(target_modules=targets, columns=columns, neurons=rows or None)
        return get_peft_model(base, cfg)

    return make


def _lora(dora: bool) -> Callable:
    def make(base):
        return get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=list(TARGETS), use_dora=dora))

    return make


def _full(base):
    return base


def _floor(base):
    base.requires_grad_(False)
    return base


BUILDERS: dict[str, Callable] = {
    "neuron-10": _neuron(0.1),
    "neuron-40": _neuron(0.4),
    "neuron-100": _neuron(1.0),
    "lora": _lora(False),
    "dora": _lora(True),
    "full": _full,
    "floor": _floor,
    # not in the default set: the additive path (works on any base layer), for comparison with the live default
    "neuron-10-additive": _neuron(0.1, "additive"),
    # --routing: 10% rows, 1:9 split over 4 groups, mixed-language batches (compare with neuron-10, unrouted)
    "neuron-10-routed": _neuron_routed(0.1),
    # --columns: column units (issue 26) at LoRA r16's and at neuron-10's trainable count
    "channel-lora": _columns("lora"),
    "channel-10": _columns("neuron-10"),
    "mlp-neuron-lora": _columns("lora", mlp_neuron=True),
    "mlp-neuron-10": _columns("neuron-10", mlp_neuron=True),
}
COLUMN_METHODS = ["channel-lora", "channel-10", "mlp-neuron-lora", "mlp-neuron-10"]


@dataclass
class Runner:
    """One method's model, optimizer and step function."""

    name: str
    model: torch.nn.Module
    opt: Optional[torch.optim.Optimizer]
    trainable: int
    times: list = field(default_factory=list)  # wall seconds per timed step
    cpu_times: list = field(default_factory=list)  # process CPU seconds per timed step (robust to a busy host)

    def step(self, ids: torch.Tensor) -> None:
        if self.opt is None:  # floor: backward to the input embeddings only
            emb = self.model.get_input_embeddings()(ids).detach().requires_grad_(True)
            self.model(inputs_embeds=emb, labels=ids).loss.backward()
            return
        extra = {}
        if self.name.endswith("-routed"):  # one group per sample, all four groups in every batch
            extra["neuron_groups"] = [ROUTING_GROUPS[i % len(ROUTING_GROUPS)] for i in range(ids.shape[0])]
        self.model(input_ids=ids, labels=ids, **extra).loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def _count_trainable(name: str, preset: Preset) -> int:
    return _trainable_of(name, build_base(preset))


def make_runner(name: str, preset: Preset) -> Runner:
    model = BUILDERS[name](build_base(preset)).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5) if name != "floor" else None
    return Runner(name, model, opt, sum(p.numel() for p in params))


# ---------------------------------------------------------------------------------------------- measuring


def measure_peak(name: str, preset: Preset, ids: torch.Tensor) -> int:
    """Peak bytes of one training step of `name` in steady state (second step), nothing else of it alive."""
    return peak_bytes(lambda: functools.partial(make_runner(name, preset).step, ids), preset.device)


def measure_training(methods: list[str], preset: Preset, ids: torch.Tensor, rounds: int, warmup: int,
                     steps: int, log=print) -> dict[str, Runner]:  # fmt: skip
    """Interleaved rounds: all models resident, each round visits every method (rotated order)."""
    runners = {m: make_runner(m, preset) for m in methods}
    for r in runners.values():
        for _ in range(warmup):
            r.step(ids)
    sync(preset.device)
    for rnd in tqdm(range(rounds), desc="timing rounds", unit="round", leave=False):
        order = methods[rnd % len(methods) :] + methods[: rnd % len(methods)]
        for m in order:
            r = runners[m]
            for _ in range(steps):
                wall, cpu = timed(lambda r=r: r.step(ids), preset.device)
                r.times.append(wall)
                r.cpu_times.append(cpu)
        log(f"  round {rnd + 1}/{rounds}: " + ", ".join(f"{m} {1e3 * runners[m].times[-1]:.0f}" for m in methods))
    return runners


def measure_inference(preset: Preset, ids: torch.Tensor, rounds: int, steps: int, clock: int = 0) -> dict:
    """Forward-only time: base vs NeuronSelect 10% unmerged vs merged, interleaved."""
    models = {
        "base": build_base(preset),
        "neuron-10 unmerged": BUILDERS["neuron-10"](build_base(preset)),
        "neuron-10 merged": BUILDERS["neuron-10"](build_base(preset)),
    }
    # non-zero deltas so unmerged/merged really differ from the base (as after training)
    for name in ("neuron-10 unmerged", "neuron-10 merged"):
        with torch.no_grad():
            for n, p in models[name].named_parameters():
                if "neuron_select_delta" in n:
                    p.normal_(0, 1e-3)
    models["neuron-10 merged"].merge_adapter()
    times = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():
            m.eval()
            m(input_ids=ids)  # warm-up
        names = list(models)
        for rnd in tqdm(range(rounds), desc="inference rounds", unit="round", leave=False):
            for k in names[rnd % 3 :] + names[: rnd % 3]:
                for _ in range(steps):
                    times[k].append(timed(lambda k=k: models[k](input_ids=ids), preset.device)[clock])
    models.clear()
    release(preset.device)
    return times


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--device", choices=["cpu", "cuda"], help="override the preset's device")
    p.add_argument("--methods", help=f"comma-separated subset of {','.join(BUILDERS)} (default: {','.join(METHODS)})")
    p.add_argument("--rounds", type=int, help="interleaved timing rounds (median over all)")
    p.add_argument("--warmup", type=int, help="untimed steps per method before the rounds")
    p.add_argument("--steps", type=int, help="timed steps per method per round")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU); preset default")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="override the preset's dtype")
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="time the ratios and inference use: wall (default) or process CPU time (robust on a busy host at 1 thread)",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument("--memory-only", action="store_true", help="only the peak-memory pass (no timing)")
    p.add_argument("--no-inference", action="store_true", help="skip the inference-overhead measurement")
    p.add_argument("--routing", action="store_true", help="also time neuron-10-routed (4 groups, mixed batches)")
    p.add_argument("--columns", action="store_true", help=f"also time the column units {','.join(COLUMN_METHODS)}")
    p.add_argument("--json", metavar="PATH", help="write all results and raw timings to PATH")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    args = p.parse_args(argv)
    try:  # before any timing: a run must not end by refusing (or silently replacing) its output file
        if args.json:
            check_output_file(args.json, overwrite=args.overwrite, flag="--json")
    except OutputPathError as err:
        p.error(str(err))
    return args


def main(argv=None, log=print) -> Optional[dict]:
    """Run the benchmark; returns the results dict (None when the requested device is unavailable)."""
    args = parse_args(argv)
    preset = resolve_preset(PRESETS, args, log)
    if preset is None:
        return None
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else list(METHODS)
    if args.routing:
        methods += [m for m in ("neuron-10", "neuron-10-routed") if m not in methods]
    if args.columns:
        methods += [m for m in COLUMN_METHODS if m not in methods]
    unknown = sorted(set(methods) - set(BUILDERS))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {list(BUILDERS)}")
    rounds = preset.rounds if args.rounds is None else args.rounds
    warmup = preset.warmup if args.warmup is None else args.warmup
    steps = preset.steps if args.steps is None else args.steps

    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, preset.model["vocab_size"], (preset.batch, preset.seq), generator=gen).to(preset.device)
    info = speed_machine_info(preset.device)
    mem_method = (
        "torch.cuda.max_memory_allocated over the 2nd step, one model resident"
        if preset.device == "cuda"
        else "torch.profiler profile_memory: replayed alloc/free events from an empty start; peak live bytes in step 2"
    )
    log(f"preset {args.preset}: {preset.model}, batch {preset.batch}x{preset.seq}, {preset.device} {preset.dtype}")
    log(f"machine: {info}")
    log(f"rounds {rounds} x {steps} timed step(s), warmup {warmup}; methods {methods}")

    results = {
        "preset": args.preset, "model": preset.model, "batch": preset.batch, "seq": preset.seq,
        "device": preset.device, "dtype": str(preset.dtype), "rounds": rounds, "steps": steps, "warmup": warmup,
        "machine": info, "memory_method": mem_method, "argv": sys.argv if argv is None else list(argv),
        "methods": {}, "ratio_key": "cpu_ms_median" if args.clock == "cpu" else "ms_median", "clock": args.clock,
    }  # fmt: skip

    peaks = {}
    if not args.no_memory:
        log(f"peak memory ({mem_method}) ...")
        for m in methods:
            peaks[m] = measure_peak(m, preset, ids) / MiB
            log(f"  {m}: {peaks[m]:.1f} MiB")

    if args.memory_only:
        for m in methods:
            results["methods"][m] = {
                "trainable": _count_trainable(m, preset),
                "ms_median": None,
                "peak_mib": peaks.get(m),
            }
    else:
        log("training step time ...")
        t0 = time.perf_counter()
        runners = measure_training(methods, preset, ids, rounds, warmup, steps, log=log)
        log(f"  ({time.perf_counter() - t0:.0f} s)")
        for m in methods:
            r = runners[m]
            results["methods"][m] = {
                "trainable": r.trainable,
                "ms_median": 1e3 * statistics.median(r.times),
                "ms_min": 1e3 * min(r.times),
                "cpu_ms_median": 1e3 * statistics.median(r.cpu_times),
                "ms_all": [1e3 * t for t in r.times],
                "cpu_ms_all": [1e3 * t for t in r.cpu_times],
                "peak_mib": peaks.get(m),
            }
        del runners
        release(preset.device)
    results["machine"]["loadavg_end"] = speed_machine_info(preset.device).get("loadavg")

    if not args.no_inference and not args.memory_only:
        log("inference (forward only, no_grad) ...")
        times = measure_inference(preset, ids, rounds, preset.infer_steps, clock=int(args.clock == "cpu"))
        base, base_min = statistics.median(times["base"]), min(times["base"])
        results["inference"] = {
            k: {"ms_median": 1e3 * statistics.median(v), "ms_min": 1e3 * min(v), "ms_all": [1e3 * t for t in v],
                "overhead": None if k == "base" else statistics.median(v) / base - 1.0,
                "overhead_min": None if k == "base" else min(v) / base_min - 1.0}
            for k, v in times.items()
        }  # fmt: skip

    results["targets"] = targets(results)
    log_report(results, log)
    if args.json:
        atomic_write_json(args.json, results, indent=2, default=str)
        log(f"wrote {args.json}")
    bad = [m for m, r in results["methods"].items() if r["ms_median"] is not None and not math.isfinite(r["ms_median"])]
    if bad:
        log(f"non-finite timings for {bad}")
    return results


if __name__ == "__main__":
    main()
