"""GPU check: the training step, eager vs ``torch.compile`` inference, and the half model's accuracy, on one GPU.

    python -m benchmarks.gpu_check                               # CUDA, nafnet-gopro-width32, within 420 s
    python -m benchmarks.gpu_check --json gpu_check.json         # the same, also written to a file (atomically)
    python -m benchmarks.gpu_check --budget-s 240                # a shorter run: what does not fit is skipped
    python -m benchmarks.gpu_check --device cpu --tiny           # the smoke form the tests run (< 60 s)

Prints one JSON object on stdout (progress goes to stderr). Every figure carries its unit in its key
(``units`` lists them). Sections:

- ``train``: one optimizer step of the project's training (``train.bench.project_step``: forward with
  every head, the config's loss on the best output, backward, gradient clipping, the fused AdamW step, a
  grad scaler with fp16 as in the loop) at batch 8 of 256x256 crops in fp32, AMP bf16 and AMP fp16; each
  precision in a worker process of its own, timed in turns (``train.bench.time_interleaved``): images/s
  of the median step and ``torch.cuda.max_memory_allocated`` of that process.
- ``inference``: the model with TLC (``convert_to_tlc`` at train size 256, as ``infer`` runs a checkpoint)
  at 720x1280 in fp32, fp16 (the FP16 placement of ``TorchRunner``) and bf16, eager vs
  ``torch.compile``: median latency of a forward on a device-resident batch of one (timed in turns after
  warm-up), the first compiled call's time and max |compiled - eager|.
- ``fp16``: on a blurred bundled photo at 720x1280, max |diff| and PSNR against the FP32 output (TF32
  off) of the half model with the project's placement (``export.fp16_stream.plan`` + ``to_half``: the
  FP32 islands of the model code, and FP32 residual streams where the stream would overflow FP16) and of a
  plain ``.half()``; for the randomised weights and for the same weights with the level-0 stream scaled
  past FP16's range (where the placement matters).

Weights are random but non-trivial and deterministic (:func:`randomise`): a fresh NAFNet has
beta = gamma = 0, so every block would be skipped and every precision would agree.

``--budget-s`` bounds the whole run: before each part the time it needs (measured on the parts before it
where possible) is compared with what is left, and a part that would not fit is reported as skipped with
the reason; the budget is checked between parts, so one part already running is not cut short.

On a CPU, ``--tiny`` skips ``torch.compile``: the first compiled call of the tiny model (fp32, 32x48) took
184 s on the 2-core development machine with an empty inductor cache (load 2.5-4.5; not finished after
600 s at 64x96, load ~7), 8 s once the cache held it; without ``--tiny`` it is attempted within the budget.
The rest of the CPU ``--tiny`` run took 15 s there (load ~3) and 56 s while other test suites shared the cores.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import nafnet_core as nc
from nafnet_core.errors import UserError
from nafnet_core.fileio import atomic_write_text

#: Sizes of the full check and of ``--tiny``.
FULL = {"preset": "nafnet-gopro-width32", "train_preset": "gopro", "batch": 8, "crop": 256, "train_warmup": 2,
        "train_steps": 5, "size": (720, 1280), "warmup": 2, "repeats": 10}
TINY = {"preset": "tiny", "train_preset": "tiny", "batch": 2, "crop": 16, "train_warmup": 1, "train_steps": 1,
        "size": (32, 48), "warmup": 1, "repeats": 1}
DEFAULT_BUDGET_S = 420.0
#: Seconds a part is expected to take before one like it has been measured, per device type.
FIRST_GUESS_S = {"cuda": {"train": 60.0, "fp16": 20.0, "eager": 10.0, "compile": 90.0},
                 "cpu": {"train": 20.0, "fp16": 10.0, "eager": 5.0, "compile": 600.0}}
#: The level-0 stream of the ``stream_scaled`` case is multiplied by this: past FP16's 65504.
STREAM_SCALE = 6e4
UNITS = {"_ms": "milliseconds", "_s": "seconds", "_mib": "MiB (2**20 bytes)", "_db": "dB (PSNR, data range 1)",
         "images_per_s": "images per second", "max_abs_diff": "output units (images in [0, 1])",
         "speedup": "ratio (eager time / compiled time)", "nonfinite_values": "count of inf/NaN output values"}
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def say(message: str) -> None:
    print(f"[gpu_check] {message}", file=sys.stderr, flush=True)


def figure(x: float | None, digits: int = 3) -> float | None:
    """``x`` rounded, or None where it is missing or not finite (JSON has no inf/NaN)."""
    return None if x is None or not math.isfinite(x) else round(float(x), digits)


# --------------------------------------------------------------------------------------------- budget

class Budget:
    """The run's time: what is left, and whether a part that needs ``need_s`` still fits."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = time.monotonic()
        self.skipped: list[str] = []

    def used(self) -> float:
        return time.monotonic() - self.start

    def refuse(self, part: str, need_s: float) -> str | None:
        """None when ``part`` fits, else the reason it is skipped (and it is listed as skipped)."""
        left = self.seconds - self.used()
        if left >= need_s:
            return None
        self.skipped.append(part)
        return (f"budget: {max(left, 0):.0f} s of --budget-s {self.seconds:g} left, {part} needs about "
                f"{need_s:.0f} s")


class Guesses:
    """How long a kind of part takes: the last measured one, else :data:`FIRST_GUESS_S`."""

    def __init__(self, device: str):
        self.seconds = dict(FIRST_GUESS_S["cuda" if device == "cuda" else "cpu"])

    def __getitem__(self, kind: str) -> float:
        return self.seconds[kind]

    def measured(self, kind: str, seconds: float) -> None:
        self.seconds[kind] = seconds


# --------------------------------------------------------------------------------------------- inputs

def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Deterministic non-trivial weights, in place: beta/gamma ~ N(0, 0.5), LayerNorm affines perturbed
    (weight 1 + N(0, 0.2), bias N(0, 0.2)) and the SCA's 1x1 conv x4 (so TLC's local means matter)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("beta", "gamma"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif ".norm" in name and leaf in ("weight", "bias"):
                p.copy_((1.0 if leaf == "weight" else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".sca.1.weight"):
                p.mul_(4.0)
    return model.eval()


def scale_level0_stream(model: nc.NAFNet, scale: float = STREAM_SCALE) -> nc.NAFNet:
    """A copy of ``model`` whose level-0 residual stream (encoder 0 and the last decoder) is ``scale`` times
    larger while its output stays the same up to rounding: the convs writing into the stream and the blocks'
    beta/gamma are multiplied, the convs reading it divided."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        m.intro.weight.mul_(scale)
        m.intro.bias.mul_(scale)
        for block in [*m.encoders[0], *m.decoders[-1]]:
            block.beta.mul_(scale)
            block.gamma.mul_(scale)
        m.downs[0].weight.div_(scale)
        m.ups[-1][0].weight.mul_(scale)  # the upsampled decoder input joins the scaled skip
        m.ending.weight.div_(scale)
    return m.eval()


def blurry_photo(height: int, width: int, index: int = 0) -> torch.Tensor:
    """A bundled photo (scikit-image's samples via ``export.samples``) with a diagonal motion blur averaged
    in linear light, as the synthetic set renders camera shake: (1, 3, height, width) in [0, 1]."""
    from export.samples import sample_photo

    x = sample_photo(height, width, index=index)
    lin = torch.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)
    length = max(3, round(width / 64)) | 1  # 20 px at 1280 wide (GoPro's blur: 20-60 px), odd
    kernel = torch.zeros(length, length)
    kernel[torch.arange(length), torch.arange(length)] = 1.0 / length
    pad = length // 2
    lin = F.conv2d(F.pad(lin, (pad, pad, pad, pad), mode="replicate"), kernel.expand(3, 1, length, length), groups=3)
    lin = lin.clamp(0, 1)
    return torch.where(lin <= 0.0031308, lin * 12.92, 1.055 * lin ** (1 / 2.4) - 0.055).clamp(0, 1)


def inference_model(preset: str, train_size: int) -> nc.NAFNet:
    torch.manual_seed(0)
    return nc.convert_to_tlc(randomise(nc.create_model(preset)), train_size=train_size).eval()


_PLANS: dict[int, tuple[nc.NAFNet, dict]] = {}


def placement(model: nc.NAFNet, photo_hw: tuple[int, int] | None) -> dict:
    """``export.fp16_stream.plan`` of ``model`` (once per model): measured on its default sample photos, or
    on two bundled photos of ``photo_hw`` (``--tiny``: the tiny model's stream needs no 256x256 photos)."""
    from export.ranges import plan
    from export.samples import sample_photo

    if id(model) not in _PLANS:
        images = None if photo_hw is None else [sample_photo(*photo_hw, index=i) for i in range(2)]
        _PLANS[id(model)] = (model, plan(model, images))  # the model is kept: its id stays its own
    return _PLANS[id(model)][1]


def half_modules(model: nc.NAFNet, photo_hw: tuple[int, int] | None) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    """(half with the project's FP16 placement, plain ``.half()``, the placement record) of ``model``."""
    from export.fp16_stream import to_half

    record = placement(model, photo_hw)
    return to_half(model, record["fp32_stream"]), copy.deepcopy(model).half().eval(), record


def precision_module(model: nc.NAFNet, precision: str, device: str,
                     photo_hw: tuple[int, int] | None) -> torch.nn.Module:
    """``model`` as ``TorchRunner`` runs it in ``precision``: fp16 with the FP16 placement, else a cast copy."""
    if precision == "fp16":
        return half_modules(model, photo_hw)[0].to(device)
    return copy.deepcopy(model).to(device, PRECISIONS[precision]).eval()


# --------------------------------------------------------------------------------------------- timing

def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def seconds_of(fn: Callable[[], object], device: str) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def interleaved_ms(fns: dict[str, Callable[[], object]], device: str, warmup: int, repeats: int) -> dict[str, float]:
    """Median milliseconds of each function: ``warmup`` untimed calls each, then ``repeats`` rounds of one
    call each in turns (a load change hits every side alike)."""
    for fn in fns.values():
        for _ in range(warmup):
            seconds_of(fn, device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(seconds_of(fn, device))
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


# --------------------------------------------------------------------------------------------- sections

def train_section(sizes: dict, device: str, budget: Budget, guesses: Guesses) -> dict:
    """Training-step images/s and peak memory per precision (each in its own worker process)."""
    from train.bench import Side, time_interleaved
    from train.config import build_config
    from train.speed import resolve

    threads = torch.get_num_threads()
    section = {"model": sizes["preset"], "batch": sizes["batch"], "crop": sizes["crop"],
               "warmup_steps": sizes["train_warmup"], "timed_steps": sizes["train_steps"],
               "step": "train.bench.project_step (forward all heads, loss on the best, backward, clip, fused "
                       "AdamW, grad scaler with fp16), one worker process per precision, timed in turns",
               "memory": ("torch.cuda.max_memory_allocated of the precision's process" if device == "cuda"
                          else "peak RSS of the precision's process (CPU run: no CUDA memory)"),
               "modes": {}}
    sides, names = [], {}
    for mode, amp in (("fp32", "off"), ("amp_bf16", "bf16"), ("amp_fp16", "fp16")):
        cfg = build_config(sizes["train_preset"], sets={"model": sizes["preset"], "batch": sizes["batch"],
                                                       "crop": sizes["crop"], "amp": amp, "compile": "off",
                                                       "channels_last": "off"})
        try:
            resolve(cfg, torch.device(device))
        except UserError as e:
            section["modes"][mode] = {"skipped": str(e)}
            continue
        if device == "cuda" and amp == "bf16" and not torch.cuda.is_bf16_supported():
            section["modes"][mode] = {"skipped": f"{torch.cuda.get_device_name(0)} has no bf16 support"}
            continue
        names[mode] = Side(mode, ["train.bench", "--worker", json.dumps(cfg.to_dict()), "--device", device,
                                  "--threads", str(threads)])
        sides.append(names[mode])
    reason = budget.refuse("train", guesses["train"])
    if reason:
        section["modes"] |= {mode: {"skipped": reason} for mode in names}
        return section
    start = time.monotonic()
    say(f"train: {', '.join(names)} at batch {sizes['batch']} of {sizes['crop']}x{sizes['crop']}")
    time_interleaved(sides, steps=sizes["train_steps"], warmup=sizes["train_warmup"], device=device, progress=True)
    guesses.measured("train", time.monotonic() - start)
    for mode, side in names.items():
        if side.error or not side.times:
            section["modes"][mode] = {"skipped": f"failed: {side.error or 'no step timed'}"}
            continue
        step_s = statistics.median(side.times)
        section["modes"][mode] = {"step_median_ms": figure(1e3 * step_s, 2),
                                  "images_per_s": figure(sizes["batch"] / step_s, 2),
                                  "peak_memory_mib": figure(side.peak_mb, 1), "first_step_s": figure(side.first, 2)}
    base = section["modes"].get("fp32", {}).get("images_per_s")
    for mode, row in section["modes"].items():
        if base and row.get("images_per_s") and mode != "fp32":
            row["speedup_vs_fp32"] = figure(row["images_per_s"] / base, 3)
    return section


def fp16_case(model: nc.NAFNet, x: torch.Tensor, device: str, photo_hw: tuple[int, int] | None) -> dict:
    """Half with the placement and plain ``.half()`` of ``model`` against its FP32 output on ``x``."""
    from nafnet_core.metrics import psnr

    placed, plain, record = half_modules(model, photo_hw)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # a true FP32 reference
    try:
        with torch.inference_mode():
            xd = x.to(device)
            ref = copy.deepcopy(model).to(device).eval()(xd).float()
            outs = {"placed": placed.to(device)(xd.half()).float(), "plain_half": plain.to(device)(xd.half()).float()}
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    case = {"fp32_stream_stages": record["fp32_stream"], "fp32_convs": record["fp32_convs"],
            "stream_max_on_samples": figure(record["max_stream"], 4), "stream_measured_on": record["measured_on"]}
    for name, y in outs.items():
        bad = int((~torch.isfinite(y)).sum())
        row = {"nonfinite_values": bad,
               "max_abs_diff": None if bad else figure((y - ref).abs().max().item(), 6),
               "psnr_db": None if bad else figure(psnr(y.clamp(0, 1), ref.clamp(0, 1), data_range=1.0).item(), 2)}
        if bad:
            row["note"] = f"{bad} of {y.numel()} output values are inf/NaN: the stream overflowed FP16"
        case[name] = row
    return case


def fp16_section(model: nc.NAFNet, sizes: dict, device: str, budget: Budget, guesses: Guesses,
                 photo_hw: tuple[int, int] | None) -> dict:
    h, w = sizes["size"]
    section = {"model": sizes["preset"], "size": f"{h}x{w}", "tlc_train_size": sizes["crop"],
               "input": "bundled photo (astronaut), diagonal motion blur in linear light",
               "reference": "the FP32 model on the same device, TF32 off",
               "placed": "export.fp16_stream.plan + to_half (as TorchRunner fp16 and the FP16 export)",
               "plain_half": "model.half() (the model code's FP32 islands only)", "cases": {}}
    x = blurry_photo(h, w)
    for name, case_model in (("randomised", lambda: model), ("stream_scaled", lambda: scale_level0_stream(model))):
        reason = budget.refuse(f"fp16 {name}", guesses["fp16"])
        if reason:
            section["cases"][name] = {"skipped": reason}
            continue
        start = time.monotonic()
        say(f"fp16: {name}")
        section["cases"][name] = fp16_case(case_model(), x, device, photo_hw)
        guesses.measured("fp16", time.monotonic() - start)
    section["cases"]["stream_scaled"] = {"level0_stream_scale": STREAM_SCALE, **section["cases"]["stream_scaled"]}
    return section


def inference_section(model: nc.NAFNet, sizes: dict, device: str, tiny: bool, budget: Budget, guesses: Guesses,
                      photo_hw: tuple[int, int] | None) -> dict:
    h, w = sizes["size"]
    section = {"model": sizes["preset"], "size": f"{h}x{w}", "batch": 1, "tlc_train_size": sizes["crop"],
               "warmup": sizes["warmup"], "repeats": sizes["repeats"],
               "timing": "median of forwards on a device-resident input, synchronised, eager and compiled in turns",
               "compile": "torch.compile(module) with its defaults", "precisions": {}}
    x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    for precision, dtype in PRECISIONS.items():
        row: dict = {}
        section["precisions"][precision] = row
        if device == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
            row["skipped"] = f"{torch.cuda.get_device_name(0)} has no bf16 support"
            continue
        reason = budget.refuse(f"inference {precision} eager", guesses["eager"])
        if reason:
            row["skipped"] = reason
            continue
        start = time.monotonic()
        module = precision_module(model, precision, device, photo_hw)
        xd = x.to(device, dtype)

        def eager(module: torch.nn.Module = module, xd: torch.Tensor = xd) -> torch.Tensor:
            with torch.inference_mode():
                return module(xd)

        eager_ms = interleaved_ms({"eager": eager}, device, sizes["warmup"], sizes["repeats"])["eager"]
        row["eager_median_ms"] = figure(eager_ms, 2)
        guesses.measured("eager", time.monotonic() - start)
        reason = ("torch.compile on a CPU is skipped with --tiny: the first compiled call of the tiny model "
                  "took 184 s on a 2-core machine (empty inductor cache)" if tiny and device == "cpu"
                  else budget.refuse(f"inference {precision} compile", guesses["compile"] + guesses["eager"]))
        if reason:
            row["compiled"] = {"skipped": reason}
            continue
        say(f"inference: compiling {precision}")
        compiled_module = torch.compile(module)

        def compiled(compiled_module: torch.nn.Module = compiled_module, xd: torch.Tensor = xd) -> torch.Tensor:
            with torch.inference_mode():
                return compiled_module(xd)

        start = time.monotonic()
        try:
            first_s = seconds_of(compiled, device)
        except Exception as e:  # noqa: BLE001 - a backend that cannot compile here is a row, not a crash
            row["compiled"] = {"skipped": f"torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            continue
        guesses.measured("compile", time.monotonic() - start)
        times = interleaved_ms({"eager": eager, "compiled": compiled}, device, sizes["warmup"], sizes["repeats"])
        diff = (compiled().float() - eager().float()).abs().max().item()
        row["eager_median_ms"] = figure(times["eager"], 2)  # the interleaved figure, beside the compiled one
        row["compiled"] = {"median_ms": figure(times["compiled"], 2), "first_call_s": figure(first_s, 1),
                           "max_abs_diff_vs_eager": figure(diff, 6)}
        row["speedup"] = figure(times["eager"] / times["compiled"], 3)
    return section


# --------------------------------------------------------------------------------------------- report

def machine(device: str) -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if device == "cuda" else None,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info |= {"gpu": torch.cuda.get_device_name(0), "compute_capability": f"{props.major}.{props.minor}",
                 "gpu_memory_mib": figure(props.total_memory / 2**20, 0),
                 "multiprocessors": props.multi_processor_count,
                 "bf16_supported": torch.cuda.is_bf16_supported(),
                 "tf32_convolutions": torch.backends.cudnn.allow_tf32,
                 "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    return info


def run_check(device: str = "cuda", tiny: bool = False, budget_s: float = DEFAULT_BUDGET_S) -> dict:
    """Every section on ``device`` within ``budget_s``; the report as a dict (see the module docstring)."""
    sizes = TINY if tiny else FULL
    budget, guesses = Budget(budget_s), Guesses(device)
    report = {"check": "benchmarks.gpu_check", "device": device, "tiny": tiny, "machine": machine(device),
              "units": UNITS}
    seconds = {}

    def timed(name: str, fn: Callable[[], dict]) -> None:
        start = time.monotonic()
        report[name] = fn()
        seconds[name + "_s"] = figure(time.monotonic() - start, 1)

    timed("train", lambda: train_section(sizes, device, budget, guesses))
    model = inference_model(sizes["preset"], sizes["crop"])
    photo_hw = sizes["size"] if tiny else None  # the FP16 placement's photos: the product's, or tiny ones
    timed("fp16", lambda: fp16_section(model, sizes, device, budget, guesses, photo_hw))
    timed("inference", lambda: inference_section(model, sizes, device, tiny, budget, guesses, photo_hw))
    report["budget"] = {"budget_s": budget_s, "used_s": figure(budget.used(), 1), "sections": seconds,
                        "skipped_for_budget": budget.skipped}
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--tiny", action="store_true", help="the tiny preset, small sizes, 1-2 steps (the tests' form)")
    ap.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                    help=f"seconds for the whole run; parts that would not fit are skipped "
                         f"(default {DEFAULT_BUDGET_S:g})")
    ap.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the report to FILE")
    a = ap.parse_args(argv)
    if not a.budget_s > 0:
        print(f"gpu_check: --budget-s {a.budget_s:g}: give a positive number of seconds", file=sys.stderr)
        return 2
    if a.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda: torch sees no CUDA GPU (torch.cuda.is_available() is False); "
              "run it on a GPU machine or pass --device cpu", file=sys.stderr)
        return 2
    if a.json is not None and not a.json.parent.resolve().is_dir():
        print(f"gpu_check: --json {a.json}: folder {a.json.parent} does not exist", file=sys.stderr)
        return 2
    report = run_check(a.device, a.tiny, a.budget_s)
    text = json.dumps(report, indent=1)
    if a.json is not None:
        atomic_write_text(a.json, text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
