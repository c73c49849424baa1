"""The adaptive-exit runtime of AdaRevD exports (:mod:`export.adarevd`), on onnxruntime.

For an image it reflect-pads to the export's padded size, runs graph E (the encoder features and every
tile's classifier logits), picks each tile's depth ``d = exits[argmax(logits)]`` (or a fixed depth:
``exit="fixed:K"``), cuts every level's features into the tiles, and runs step graph k only on the tiles
deeper than k: tiles sorted by depth, so each step runs once on one batch (a prefix of the sorted tiles),
and each tile leaves through the head of its own depth. The tile residuals are blended as the model blends
them (:func:`nafnet_core.adarevd.blend`) and added to the image. :meth:`AdaRevDRuntime.run_all_select` is
the reference: every step on every tile, then each tile's own depth selected.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from nafnet_core.adarevd import blend, cut_tiles, pad_reflect
from nafnet_core.config import ModelConfig
from nafnet_core.errors import UserError

FORMAT = "adarevd-export"


@dataclass
class AdaRevDResult:
    """The restored image (1, C, H, W) FP32, each tile's depth (row-major) and how many tiles left at each
    depth 0..K."""

    image: np.ndarray
    depths: list[int]
    histogram: list[int]
    #: seconds of graph E, of each step that ran (with its batch of tiles) and of the blend
    seconds: dict = field(default_factory=dict)


class _EngineGraph:
    """A TensorRT engine called as an onnxruntime session is (``run(None, feed)`` -> outputs in graph order)."""

    def __init__(self, path: Path):
        from .trt import EngineSession

        self.session = EngineSession(path)

    def run(self, _names, feed: dict) -> list[np.ndarray]:
        outs = self.session.run_named(feed)
        return [outs[n].numpy() for n in self.session.outputs]


def parse_exit(exit_mode: str, depth: int) -> int | None:
    """``auto`` -> None (the classifier decides); ``fixed:K`` -> K (0..depth)."""
    if exit_mode == "auto":
        return None
    if exit_mode.startswith("fixed:") and exit_mode[6:].isdigit() and 0 <= int(exit_mode[6:]) <= depth:
        return int(exit_mode[6:])
    raise UserError(f"--exit {exit_mode!r}: use auto or fixed:K with K in 0..{depth}")


class AdaRevDRuntime:
    """Runs an AdaRevD export folder.

    Args:
        export_dir: what :func:`export.adarevd.export_adarevd` wrote.
        precision: ``fp32`` or ``fp16`` (the FP16 graphs, where exported).
        threads: onnxruntime intra-op threads (None: its default).
        backend: ``onnxruntime`` (CPU), or ``tensorrt``: the engines built from the FP16 graphs (``export
            --trt``; a CUDA GPU and the tensorrt package).
    """

    def __init__(self, export_dir: str | Path, precision: str = "fp32", threads: int | None = None,
                 backend: str = "onnxruntime"):
        self.dir = Path(export_dir)
        self.manifest = _manifest(self.dir)
        if self.manifest.get("format") != FORMAT:
            raise UserError(f"{self.dir}: not an AdaRevD export (manifest format "
                            f"{self.manifest.get('format')!r})")
        if precision not in self.manifest["precisions"]:
            raise UserError(f"{self.dir}: no {precision} graphs (exported: {', '.join(self.manifest['precisions'])})")
        self.config = ModelConfig.from_dict(self.manifest["config"])
        self.depth = self.manifest["depth"]
        self.backend = backend
        suffix = "" if precision == "fp32" else "-fp16"
        names = [f"adarevd-encoder{suffix}"] + [f"adarevd-step{k + 1}{suffix}" for k in range(self.depth)]
        if backend == "tensorrt":
            engines = [n.replace("-fp16", "") + ".engine" for n in names]
            if precision != "fp16" or any(e not in self.manifest["files"] for e in engines):
                raise UserError(f"{self.dir}: no TensorRT engines for {precision} (built from the FP16 graphs by "
                                "`export --fp16 --trt` on a machine with an NVIDIA GPU)")
            sessions = [_EngineGraph(self.dir / e) for e in engines]
        elif backend == "onnxruntime":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            # no memory arena: the K + 1 graphs run one after another, and an arena per session would keep each
            # one's peak (AdaRevD-B at 720x1280: ~6 GB per step) for the session's life, K + 1 peaks at once
            opts.enable_cpu_mem_arena = False
            if threads:
                opts.intra_op_num_threads = threads
            sessions = [ort.InferenceSession(str(self.dir / f"{n}.onnx"), opts, providers=["CPUExecutionProvider"])
                        for n in names]
        else:
            raise UserError(f"AdaRevD backend {backend!r}: use onnxruntime or tensorrt")
        self.encoder, self.steps = sessions[0], sessions[1:]

    # ---------------------------------------------------------------------------------------------------

    def _prepare(self, image: np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        if x.dim() != 4 or x.shape[0] != 1:
            raise UserError(f"expected one image (1, C, H, W), got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if [h, w] != self.manifest["size"]:
            raise UserError(f"{self.dir}: exported for {self.manifest['size'][0]}x{self.manifest['size'][1]} images, "
                            f"got {h}x{w}; export again with --tile {h}x{w}")
        xp = pad_reflect(x, self.config.pad_multiple)
        start = time.perf_counter()
        outs = self.encoder.run(None, {"input": xp.numpy()})
        self._seconds = {"encoder": time.perf_counter() - start, "steps": []}
        features = [torch.from_numpy(f) for f in outs[:5]]
        logits = outs[5] if len(outs) > 5 else None
        t = self.manifest["tiles"]
        k1, k2 = t["k"]
        tiles = [cut_tiles(f, level, t["rows"], t["cols"], k1, k2) for level, f in enumerate(features)]
        return x, xp, [s.numpy() for s in tiles[::-1]], logits  # state (e4, e3, e2, e1, e0)

    def _step(self, k: int, state: list[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
        start = time.perf_counter()
        e3, e2, e1, e0, residual = self.steps[k].run(None, dict(zip(("e4", "e3", "e2", "e1", "e0"), state)))
        self._seconds["steps"].append({"depth": k + 1, "tiles": len(state[0]),
                                       "seconds": time.perf_counter() - start})
        return [state[0], e3, e2, e1, e0], residual

    def _finish(self, x, xp, residual: np.ndarray, depths: list[int]) -> AdaRevDResult:
        h, w = x.shape[-2:]
        start = time.perf_counter()
        out = (blend(torch.from_numpy(residual), 1, tuple(xp.shape[-2:]), self.config) + xp)[:, :, :h, :w]
        counts = Counter(depths)
        seconds = {**self._seconds, "blend": time.perf_counter() - start}
        return AdaRevDResult(out.numpy(), depths, [counts.get(d, 0) for d in range(self.depth + 1)], seconds)

    def depths_of(self, logits: np.ndarray | None, n_tiles: int, fixed: int | None) -> list[int]:
        if fixed is not None:
            return [fixed] * n_tiles
        if logits is None:
            return [self.depth] * n_tiles
        return [self.config.exits[i] for i in np.argmax(logits, axis=-1).tolist()]

    def run(self, image: np.ndarray, exit_mode: str = "auto") -> AdaRevDResult:
        """Restores ``image`` (1, C, H, W) float32 in [0, 1]: each tile runs only the steps of its depth."""
        fixed = parse_exit(exit_mode, self.depth)
        x, xp, state, logits = self._prepare(image)
        n = state[0].shape[0]
        depths = self.depths_of(logits, n, fixed)
        order = sorted(range(n), key=lambda i: -depths[i])  # deepest first, stable
        d = [depths[i] for i in order]
        state = [s[order] for s in state]
        parts: list[np.ndarray] = []
        pending = None  # the last step's head: the residual of every tile it ran on
        k1, k2 = state[4].shape[-2:]
        for k in range(self.depth + 1):
            still = sum(1 for v in d if v > k)
            if len(state[4]) > still:  # tiles of depth k leave now
                done = len(state[4]) - still
                parts.append(pending[still:] if k > 0 else
                             np.zeros((done, self.config.img_channel, k1, k2), np.float32))
            if still == 0 or k == self.depth:
                break
            state, pending = self._step(k, [s[:still] for s in state])
        residual_sorted = np.concatenate(parts[::-1], 0)
        residual = np.empty_like(residual_sorted)
        residual[order] = residual_sorted
        return self._finish(x, xp, residual, depths)

    def run_all_select(self, image: np.ndarray, exit_mode: str = "auto") -> AdaRevDResult:
        """The reference: every step on every tile, then each tile's residual of its own depth."""
        fixed = parse_exit(exit_mode, self.depth)
        x, xp, state, logits = self._prepare(image)
        n = state[0].shape[0]
        depths = self.depths_of(logits, n, fixed)
        k1, k2 = state[4].shape[-2:]
        every = [np.zeros((n, self.config.img_channel, k1, k2), np.float32)]
        for k in range(self.depth):
            state, residual = self._step(k, state)
            every.append(residual)
        residual = np.stack([every[d][t] for t, d in enumerate(depths)])
        return self._finish(x, xp, residual, depths)


def bench_adarevd(export_dir: str | Path, *, precisions: tuple[str, ...] = ("fp32",), rounds: int = 3,
                  warmup: int = 1, threads: int | None = None, progress: bool = True) -> dict:
    """``bench`` of an AdaRevD export at its image size: the adaptive path and every fixed exit ``fixed:K``, per
    precision, timed in interleaved rounds (every row once per round, medians), with each row's share of tiles
    at each exit and the median seconds of graph E, of each step (with its batch of tiles) and of the blend."""
    from tqdm import tqdm

    from .bench import blurred, matmul_gflops

    runtimes = {p: AdaRevDRuntime(export_dir, p, threads) for p in precisions}
    first = next(iter(runtimes.values()))
    h, w = first.manifest["size"]
    x = blurred(torch.rand(1, first.config.img_channel, h, w, generator=torch.Generator().manual_seed(0))).numpy()
    modes = ["auto"] + [f"fixed:{k}" for k in range(first.depth + 1)]
    keys = [(p, m) for p in runtimes for m in modes]
    results: dict[tuple[str, str], list[AdaRevDResult]] = {k: [] for k in keys}
    total = (warmup + rounds) * len(keys)
    with tqdm(total=total, desc="bench", unit="run", disable=not progress) as bar:
        for r in range(warmup + rounds):
            for p, m in keys:
                start = time.perf_counter()
                result = runtimes[p].run(x, m)
                result.seconds["total"] = time.perf_counter() - start
                if r >= warmup:
                    results[(p, m)].append(result)
                bar.update()
    rows = []
    for (p, m), runs in results.items():
        med = statistics.median
        steps = [{"depth": s["depth"], "tiles": s["tiles"],
                  "ms": round(1e3 * med(r.seconds["steps"][i]["seconds"] for r in runs), 1)}
                 for i, s in enumerate(runs[0].seconds["steps"])]
        n = sum(runs[0].histogram)
        rows.append({"precision": p, "mode": "adaptive" if m == "auto" else m,
                     "median_ms": round(1e3 * med(r.seconds["total"] for r in runs), 1),
                     "min_ms": round(1e3 * min(r.seconds["total"] for r in runs), 1),
                     "encoder_ms": round(1e3 * med(r.seconds["encoder"] for r in runs), 1),
                     "blend_ms": round(1e3 * med(r.seconds["blend"] for r in runs), 1),
                     "steps": steps, "histogram": runs[0].histogram,
                     "exit_shares": [round(c / n, 4) for c in runs[0].histogram]})
    from .models import machine_id

    return {"format": "adarevd-bench", "export": str(export_dir), "size": f"{h}x{w}", "rounds": rounds,
            "warmup": warmup, "threads": threads, "tiles": sum(results[keys[0]][0].histogram),
            "tile": first.manifest["tiles"]["k"], "machine": machine_id(),
            "matmul_gflops": round(matmul_gflops(threads=threads), 1), "rows": rows}


def adarevd_bench_table(result: dict) -> str:
    """The rows of :func:`bench_adarevd` as a text table."""
    from nafnet_core.cli_common import fmt, text_table

    head = ["precision", "exit", "median ms", "min", "graph E ms", "steps ms (tiles)", "blend ms", "tiles per exit"]
    lines = [[r["precision"], r["mode"], fmt(r["median_ms"], ".0f"), fmt(r["min_ms"], ".0f"),
              fmt(r["encoder_ms"], ".0f"), " + ".join(f"{s['ms']:.0f} ({s['tiles']})" for s in r["steps"]) or "-",
              fmt(r["blend_ms"], ".0f"), format_shares(r["histogram"])] for r in result["rows"]]
    return "\n".join([text_table(head, lines),
                      f"{result['size']} images, {result['tiles']} tiles of {result['tile'][0]}x{result['tile'][1]}; "
                      f"median of {result['rounds']} interleaved rounds after {result['warmup']} warm-up; this "
                      f"machine's fp32 matmul roof {result['matmul_gflops']} GFLOP/s; CPU {result['machine']['cpu']}, "
                      f"{result['machine']['cores']} cores"])


def is_adarevd_export(path: str | Path) -> bool:
    """True for a folder that :func:`export.adarevd.export_adarevd` wrote."""
    manifest = Path(path) / "manifest.json"
    if not Path(path).is_dir() or not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def infer_images(export_dir: str | Path, input_path: str | Path, out_dir: str | Path, exit_mode: str = "auto",
                 precision: str = "fp32", threads: int | None = None, overwrite: bool = False,
                 say=print, backend: str = "onnxruntime") -> list[int]:
    """Deblurs an image or the images of a folder tree with an AdaRevD export into ``out_dir`` (same relative
    paths, PNG/JPEG as the input); says each image's exit histogram; returns the total histogram."""
    from nafnet_core.images import IMAGE_SUFFIXES, read_rgb8, write_rgb8

    runtime = AdaRevDRuntime(export_dir, precision, threads, backend)
    input_path, out_dir = Path(input_path), Path(out_dir)
    files = [input_path] if input_path.is_file() else sorted(
        p for p in input_path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"{input_path}: no images found (looked for {' '.join(IMAGE_SUFFIXES)})")
    total = [0] * (runtime.depth + 1)
    for path in files:
        rel = path.name if input_path.is_file() else path.relative_to(input_path)
        target = out_dir / rel
        if target.exists() and not overwrite:  # an interrupted run resumes
            say(f"{rel}: {target} exists, skipped (--overwrite replaces it)")
            continue
        rgb = read_rgb8(path).astype(np.float32) / 255.0
        result = runtime.run(rgb.transpose(2, 0, 1)[None], exit_mode)
        out = (np.clip(result.image[0].transpose(1, 2, 0), 0, 1) * 255.0 + 0.5).astype(np.uint8)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_rgb8(target, out)
        total = [a + b for a, b in zip(total, result.histogram)]
        say(f"{rel}: exits {format_histogram(result.histogram)}")
    return total


def format_shares(histogram: list[int]) -> str:
    """``depth: share`` of the exits that some tile took, e.g. ``1: 25%, 4: 75%``."""
    n = sum(histogram) or 1
    return ", ".join(f"{d}: {100 * c / n:.0f}%" for d, c in enumerate(histogram) if c)


def format_histogram(histogram: list[int]) -> str:
    """``depth 0: n (p%), depth 1: ...`` of tiles per exit depth."""
    n = sum(histogram) or 1
    return ", ".join(f"depth {d}: {c} ({100 * c / n:.0f}%)" for d, c in enumerate(histogram))


# -- parity --------------------------------------------------------------------------------------------------

def reference_model(manifest: dict, checkpoint: str | Path):
    """The PyTorch fp32 AdaRevD model of an export's source ``checkpoint``, with the export's TLC."""
    from nafnet_core.adarevd import AdaRevD
    from nafnet_core.checkpoint import load_checkpoint
    from nafnet_core.tlc import convert_to_tlc

    model = load_checkpoint(checkpoint).model
    if not isinstance(model, AdaRevD) or model.config.to_dict() != manifest["config"]:
        raise UserError(f"{checkpoint}: not the AdaRevD model of this export (its config differs); pass the "
                        "checkpoint it was exported from with --checkpoint")
    if manifest.get("tlc_kernels"):
        model = convert_to_tlc(model, train_size=manifest["train_size"])
    return model.eval()


def check_adarevd_parity(export_dir: str | Path, data_root: str | Path, *, split: str = "test",
                         limit: int | None = None, checkpoint: str | Path | None = None, threads: int | None = None,
                         progress: bool = True, verify: bool = True):
    """``parity`` of an AdaRevD export: every precision's adaptive runtime against PyTorch fp32 (adaptive, the
    same exits), the "every step on every tile, then select" reference against it, and each fixed exit
    ``fixed:K`` against PyTorch at depth K; the limits of :data:`runtime.parity.LIMITS` per precision. Each row's
    status says on how many tiles its exits equal PyTorch's and the exit histogram. Images of another size than
    the export's are listed as failed (the graphs serve one size)."""
    from tqdm import tqdm

    import nafnet_core as nc
    from nafnet_core.fileio import sha256_file

    from .errors import RunnerError
    from .parity import ParityReport, ParityRow, _Case, _finish, _score, load_split

    export_dir = Path(export_dir)
    manifest = _manifest(export_dir)
    runtimes = {("onnxruntime", p): AdaRevDRuntime(export_dir, p, threads) for p in manifest["precisions"]}
    blocked: list[ParityRow] = []  # rows that cannot run here, with why
    if any(name.endswith(".engine") for name in manifest["files"]):
        try:
            runtimes[("tensorrt", "fp16")] = AdaRevDRuntime(export_dir, "fp16", backend="tensorrt")
        except (RunnerError, UserError, ImportError, OSError) as e:
            blocked.append(ParityRow("tensorrt", "fp16", "-", status=f"cannot run here: {e}"))
    if verify:
        bad = [n for n, rec in manifest["files"].items()
               if not (export_dir / n).is_file() or sha256_file(export_dir / n) != rec["sha256"]]
        if bad:
            raise UserError(f"{export_dir}: {', '.join(bad)} missing or changed since export (sha256); export again")
    source = checkpoint or manifest.get("source", {}).get("checkpoint")
    if not source or not Path(source).is_file():
        raise UserError(f"{export_dir}: the PyTorch reference needs the source checkpoint "
                        f"({source or 'none recorded'} not found); pass --checkpoint")
    model = reference_model(manifest, source)
    depth = manifest["depth"]
    exits = ["auto"] + [f"fixed:{k}" for k in range(depth + 1)]

    def label(e: str) -> str:
        return "adaptive" if e == "auto" else e

    refs = {e: _Case(ParityRow("torch", "fp32", label(e), status="reference" + ("" if e == "auto" else
                                                                                f" of the {e} rows")), None, None)
            for e in exits}
    cases: list[tuple[_Case, str, str]] = []  # (case, its exit mode, its reference's exit mode)
    for backend, p in runtimes:
        for e in exits:
            cases.append((_Case(ParityRow(backend, p, label(e)), None, None), e, e))
        cases.append((_Case(ParityRow(backend, p, "every depth, select"), None, None), "select", "auto"))
    tiles_total = {id(c): [0, 0] for c, _, _ in cases}  # tiles whose exits equal PyTorch's, tiles
    select_gap = {key: 0.0 for key in runtimes}  # max |every depth, select - adaptive| per runtime
    histograms = {id(c): [0] * (depth + 1) for c, _, _ in cases}
    failed: dict[str, str] = {}
    pairs, count = load_split(data_root, split, limit, failed)
    size = manifest["size"]
    n = 0
    for name, blur, sharp in tqdm(pairs, total=count, desc="parity", unit="img", disable=not progress):
        if list(blur.shape[-2:]) != size:
            failed[name] = (f"{name}: {blur.shape[-2]}x{blur.shape[-1]}, the export serves {size[0]}x{size[1]} images "
                            f"(export again with --tile {blur.shape[-2]}x{blur.shape[-1]})")
            continue
        n += 1
        gt = nc.quantize(sharp)
        with torch.no_grad():
            t = time.perf_counter()
            adaptive, torch_depths = model(blur, return_depths=True)
            refs["auto"].seconds += time.perf_counter() - t
            every = model(blur, all_depths=True)[0]
        want = {"auto": adaptive.clamp(0, 1), "fixed:0": blur.clamp(0, 1)}
        want.update({f"fixed:{k + 1}": every[k:k + 1].clamp(0, 1) for k in range(depth)})
        for e in exits:
            _score(refs[e], want[e], gt, want[e])
        got_adaptive = {}
        for case, e, ref_e in cases:
            key = (case.row.backend, case.row.precision)
            runtime = runtimes[key]
            t = time.perf_counter()
            result = (runtime.run_all_select(blur.numpy()) if e == "select" else runtime.run(blur.numpy(), e))
            case.seconds += time.perf_counter() - t
            out = torch.from_numpy(result.image).clamp(0, 1)
            if e == "auto":
                got_adaptive[key] = out
            if e == "select":
                select_gap[key] = max(select_gap[key], (out - got_adaptive[key]).abs().max().item())
            _score(case, out, gt, want[ref_e])
            want_depths = torch_depths.tolist() if e in ("auto", "select") else [int(e[6:])] * len(result.depths)
            same = sum(a == b for a, b in zip(result.depths, want_depths))
            tiles_total[id(case)][0] += same
            tiles_total[id(case)][1] += len(result.depths)
            histograms[id(case)] = [a + b for a, b in zip(histograms[id(case)], result.histogram)]
    if n == 0:
        raise UserError(f"parity: no image pairs of {size[0]}x{size[1]} to compare in {data_root} ({split} split)"
                        + (f"; {next(iter(failed.values()))}" if failed else ""))
    rows = [_finish(refs["auto"], n, refs["auto"])]
    for e in exits[1:]:  # the fixed exits' references come from one pass at every depth: no time of their own
        rows.append(_finish(refs[e], n, refs[e]))
        rows[-1].ms_per_image = None
    for case, e, ref_e in cases:
        row = _finish(case, n, refs[ref_e])
        same, total = tiles_total[id(case)]
        notes = [f"exits = PyTorch's on {same}/{total} tiles" if same < total else f"exits = PyTorch's ({total} tiles)"]
        if e == "select":
            gap = select_gap[(row.backend, row.precision)]
            ok = gap <= SELECT_ATOL
            notes.append(f"max |Δ| vs the adaptive run {gap:.1e} (<= {SELECT_ATOL:g})")
            row.passed = bool(row.passed and ok)
        if e in ("auto", "select"):
            notes.append(format_histogram(histograms[id(case)]))
        row.status = ("ok" if row.passed else "outside the limit") + "; " + "; ".join(notes)
        rows.append(row)
    report = ParityReport(rows + blocked, n, str(export_dir), failed)
    return report


#: max |Δ| between "every depth, select" and the adaptive run of the same graphs (only batch composition differs).
SELECT_ATOL = 1e-5


def _manifest(export_dir: Path) -> dict:
    try:
        return json.loads((export_dir / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{export_dir}: no readable manifest.json ({e}); export the model first") from None
