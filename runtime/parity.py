"""Check export parity: every backend x precision x (whole | tiled) against PyTorch fp32, docs/DESIGN.md §8 (Parity).

Reference: PyTorch fp32, whole image, with the export's TLC setting. For each row, on the same images:
PSNR / SSIM vs ground truth (uint8-rounded outputs, averaged per image), ΔPSNR = row PSNR - reference
PSNR, PSNR of the row's output vs the reference output (clamped floats, worst image), max |Δ| and
ms/image. Pass limits:

    fp32 whole   |ΔPSNR| <= 0.01 dB  and  vs reference >= 60 dB
    fp16 whole   |ΔPSNR| <= 0.05 dB  and  vs reference >= 45 dB
    bf16 whole   |ΔPSNR| <= 0.05 dB  and  vs reference >= 45 dB   (with FP32 islands, as fp16; torch and OpenVINO)
    int8         |ΔPSNR| <= the export's INT8 budget (manifest ``int8.budget_db``, default 0.10 dB), whole and
                 tiled; no PSNR-vs-reference floor (INT8 noise is what the budget bounds)
    tiled        |ΔPSNR| <= 0.05 dB  (tiles vs whole image, any other precision; for a model with an input FFT,
                 ``input_fft='fs'``, a tiled row outside it is reported with no verdict: tiles change what
                 that FFT sees, and ``infer`` runs such models whole)

A row that cannot run here (no GPU, no TensorRT, no openvino package, no BF16 in this CPU, no source
checkpoint) is reported with the reason and
no verdict; a row that ran but failed on an image (an error, e.g. out of memory) fails with the image
named; the report passes when every row that ran passed. Images are processed one at a time with
every runner active, so memory does not grow with the data set.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import nafnet_core as nc
from nafnet_core.cli_common import fmt, text_table
from nafnet_core.errors import UserError, first_line
from nafnet_core.fileio import atomic_write_text
from nafnet_core.images import read_image, to_tensor

from .backends import BACKENDS, Artifact, OpenOptions
from .models import ExportInfo, describe_model, read_export
from .restore import TilingWarning, restore
from .runners import Runner, RunnerError
from .tiling import DEFAULT_TILE

#: (max |ΔPSNR| dB, min PSNR vs reference dB) per precision, whole image.
LIMITS = {"fp32": (0.01, 60.0), "fp16": (0.05, 45.0), "bf16": (0.05, 45.0)}
#: max |ΔPSNR| dB of a tiled row.
TILED_LIMIT = 0.05
#: max |ΔPSNR| dB of an INT8 row whose manifest names no budget (the export's default budget).
INT8_DEFAULT_LIMIT = 0.10
#: The status of a tiled row of an ``input_fft='fs'`` model outside TILED_LIMIT (no verdict: its input FFT spans
#: the whole image, so tiles give another output; infer runs such models whole and warns when made to tile).
WHOLE_INPUT_TILED_NOTE = ("no verdict: the input FFT spans the whole image, so tiles change the output "
                          "(infer runs this model whole; use the dynamic graph)")


@dataclass
class ParityRow:
    backend: str
    precision: str
    mode: str
    psnr: float | None = None
    ssim: float | None = None
    delta_psnr: float | None = None
    psnr_vs_reference: float | None = None  # None also when identical to the reference (infinite PSNR)
    max_abs_diff: float | None = None
    ms_per_image: float | None = None
    passed: bool | None = None
    status: str = ""

    def to_json(self) -> dict:
        d = asdict(self)
        d["pass"] = d.pop("passed")
        return d


@dataclass
class ParityReport:
    """The rows, the number of images compared, and the pairs that could not be read (file -> reason)."""

    rows: list[ParityRow]
    images: int
    export_dir: str = ""
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        ran = [r for r in self.rows if r.passed is not None]
        return bool(ran) and all(r.passed for r in ran) and not self.failed

    def to_json(self) -> dict:
        return {"pass": self.passed, "images": self.images, "export": self.export_dir,
                "limits": {"whole": {k: {"max_abs_delta_psnr": v[0], "min_psnr_vs_reference": v[1]}
                                     for k, v in LIMITS.items()}, "tiled": {"max_abs_delta_psnr": TILED_LIMIT}},
                "rows": [r.to_json() for r in self.rows], "failed": self.failed}

    def json_text(self) -> str:
        return json.dumps(self.to_json(), indent=2) + "\n"

    def write_json(self, path: str | Path) -> Path:
        return atomic_write_text(path, self.json_text())

    def table(self) -> str:
        head = ["backend", "precision", "mode", "PSNR", "SSIM", "ΔPSNR", "vs ref dB", "max|Δ|", "ms/img", "pass",
                "status"]

        lines = []
        for r in self.rows:
            vs_ref = ("identical" if r.psnr_vs_reference is None and r.max_abs_diff == 0
                      else fmt(r.psnr_vs_reference, ".1f"))
            verdict = {True: "PASS", False: "FAIL", None: "-"}[r.passed]
            lines.append([r.backend, r.precision, r.mode, fmt(r.psnr, ".3f"), fmt(r.ssim, ".4f"),
                          fmt(r.delta_psnr, "+.4f"), vs_ref, fmt(r.max_abs_diff, ".2e"), fmt(r.ms_per_image, ".0f"),
                          verdict, r.status])
        out = [text_table(head, lines)]
        out += [f"failed: {why}" for why in self.failed.values()]
        skipped = f" ({len(self.failed)} pairs could not be read, listed above)" if self.failed else ""
        out.append(f"{'PASS' if self.passed else 'FAIL'}: {self.images} images{skipped}; every row that ran "
                   f"{'passed' if self.passed else 'must pass'} (limits: fp32 |ΔPSNR|<=0.01 dB & >=60 dB vs ref, "
                   f"fp16 and bf16 <=0.05 & >=45, tiled <=0.05, int8 <= the export's budget)")
        return "\n".join(out)


@dataclass
class _Case:
    """One row to compute: a runner and how to run it (tile None = whole image); ``limit``: its own |ΔPSNR| limit
    (INT8 rows: the export's budget), else the precision's."""

    row: ParityRow
    runner: Runner | None
    tile: tuple[int, int] | str | None
    limit: float | None = None
    psnrs: list[float] = field(default_factory=list)
    ssims: list[float] = field(default_factory=list)
    vs_ref: list[float] = field(default_factory=list)
    max_diff: float = 0.0
    seconds: float = 0.0


def parity_cases(info: ExportInfo, *, torch_precisions: Sequence[str] = ("fp16", "bf16"),
                 tile: tuple[int, int] | None = None, device: str = "cpu",
                 threads: int | None = None, verify: bool = True,
                 reuse_memory: bool = False) -> tuple[Runner, list[_Case]]:
    """(reference runner, the rows) for an export: torch fp16/bf16 whole, torch fp32 tiled (``tile``, default
    the export's own tile, else DEFAULT_TILE), then every other backend's rows (:meth:`Backend.rows`: each ONNX
    graph and engine, OpenVINO fp32/bf16), whole for dynamic graphs and tiled for fixed tiles. A backend that
    cannot run here, or has nothing in the export, gets a row saying why."""
    if tile is None:
        tile = next((a.fixed_shape for a in info.artifacts if a.fixed_shape), (DEFAULT_TILE, DEFAULT_TILE))
    if info.checkpoint is None:
        raise UserError(f"{info.directory}: the PyTorch reference needs the source checkpoint: {info.checkpoint_note}; "
                        "pass --checkpoint")
    options = OpenOptions(device=device, threads=threads, verify=verify, reuse_memory=reuse_memory,
                          preset=info.preset, tlc=info.tlc, train_size=info.train_size)
    torch_backend = BACKENDS["torch"]
    source = Artifact("torch", "fp32", info.checkpoint, key="source")
    ref = torch_backend.open(source, "fp32", options)
    cases = [_Case(ParityRow("torch", p, "whole"), torch_backend.open(source, p, options), None)
             for p in torch_precisions]
    cases.append(_Case(ParityRow("torch", "fp32", f"tiled {tile[0]}x{tile[1]}"), ref, tile))
    for rec in BACKENDS.values():
        if rec.name == "torch":
            continue
        rows = rec.rows(info.artifacts)
        if not rows:
            ok, why = rec.probe(None)
            _, missing = rec.pick(info.artifacts, (info.checkpoint, info.checkpoint_note), None, None)
            status = f"cannot run here: {missing or 'nothing in the export'}" + ("" if ok else f" ({why})")
            cases.append(_Case(ParityRow(rec.name, rec.default_precision, "-", status=status), None, None))
            continue
        for precision, art in rows:
            mode = "whole" if art.fixed_shape is None else f"tiled {art.fixed_shape[0]}x{art.fixed_shape[1]}"
            row = ParityRow(rec.name, precision, mode)
            ok, why = rec.probe(precision)
            if not ok:
                row.status = f"cannot run here: {why}"
                cases.append(_Case(row, None, None))
                continue
            runner = rec.open(art, precision, options, name=f"{rec.name}-{precision}-{art.mode}")
            limit = (info.int8_budget or INT8_DEFAULT_LIMIT) if precision == "int8" else None
            cases.append(_Case(row, runner, "auto" if art.fixed_shape else "none", limit))
    for case in cases:  # the export's config says whether tiles change the model's output
        if case.runner is not None:
            describe_model(case.runner, info.config)
    return ref, cases


def _verdict(row: ParityRow, limit: float | None = None) -> bool:
    if limit is not None:  # INT8: the export's budget, whole and tiled
        return abs(row.delta_psnr) <= limit
    if row.mode.startswith("tiled"):
        return abs(row.delta_psnr) <= TILED_LIMIT
    max_delta, min_db = LIMITS[row.precision]
    vs_ref_ok = row.psnr_vs_reference is None or row.psnr_vs_reference >= min_db  # None: identical
    return abs(row.delta_psnr) <= max_delta and vs_ref_ok


def run_parity(reference: Runner, cases: list[_Case], pairs: Iterable[tuple[str, torch.Tensor, torch.Tensor]], *,
               overlap: int | None = None, progress: bool = True, total: int | None = None) -> ParityReport:
    """Runs every case on every (name, blur, sharp) pair (float32 (1, 3, H, W) in [0, 1]) against ``reference``."""
    from tqdm import tqdm

    ref_row = ParityRow("torch", "fp32", "whole", status="reference")
    ref_case = _Case(ref_row, reference, None)
    active: list[_Case] = []
    reference.activate()
    for case in cases:
        if case.runner is None:
            continue
        try:
            case.runner.activate()
            active.append(case)
        except (RunnerError, UserError, ImportError, OSError) as e:
            case.row.status = f"cannot run here: {e}"
    n = 0
    try:
        for name, blur, sharp in tqdm(pairs, total=total, desc="parity", unit="img", disable=not progress):
            n += 1
            gt = nc.quantize(sharp)
            t = time.perf_counter()
            ref_out = restore(reference, blur, "none").clamp(0, 1)
            ref_case.seconds += time.perf_counter() - t
            _score(ref_case, ref_out, gt, ref_out)
            for case in list(active):
                try:
                    t = time.perf_counter()
                    with warnings.catch_warnings():  # the row's status says it once, not a warning per image
                        warnings.simplefilter("ignore", TilingWarning)
                        out = restore(case.runner, blur, case.tile, overlap).clamp(0, 1)
                    case.seconds += time.perf_counter() - t
                except (RuntimeError, ValueError, UserError) as e:  # e.g. out of memory, engine profile too small
                    # a backend that cannot process a test image fails the check (unlike one that cannot run here)
                    case.row.status = f"failed on {name}: {first_line(e)}"
                    case.row.passed = False
                    if case.runner is not reference:
                        case.runner.deactivate()
                    active.remove(case)
                    continue
                _score(case, out, gt, ref_out)
    finally:
        reference.deactivate()
        for case in cases:
            if case.runner is not None:
                case.runner.deactivate()
    if n == 0:
        raise UserError("parity: no image pairs to compare")
    rows = [_finish(ref_case, n, ref_case)]
    for case in cases:
        if case in active:
            rows.append(_finish(case, n, ref_case))
        else:
            rows.append(case.row)
    return ParityReport(rows, n)


def _score(case: _Case, out: torch.Tensor, gt: torch.Tensor, ref_out: torch.Tensor) -> None:
    q = nc.quantize(out)
    case.psnrs.append(nc.psnr(q, gt).item())
    case.ssims.append(nc.ssim(q, gt).item())
    case.vs_ref.append(nc.psnr(out, ref_out, data_range=1.0).item())
    case.max_diff = max(case.max_diff, (out - ref_out).abs().max().item())


def _finish(case: _Case, n: int, ref: _Case) -> ParityRow:
    row = case.row
    row.psnr = round(sum(case.psnrs) / n, 4)
    row.ssim = round(sum(case.ssims) / n, 5)
    row.delta_psnr = round(row.psnr - sum(ref.psnrs) / n, 4) if case is not ref else 0.0
    worst = min(case.vs_ref)
    row.psnr_vs_reference = None if math.isinf(worst) else round(worst, 2)
    row.max_abs_diff = float(f"{case.max_diff:.3g}")
    row.ms_per_image = round(case.seconds / n * 1e3, 1)
    if case is not ref:
        row.passed = _verdict(row, case.limit)
        if not row.passed and row.mode.startswith("tiled") and getattr(case.runner, "whole_image_input", False):
            row.passed = None  # not a parity claim: what tiles cost such a model is measured, not bounded
            row.status = WHOLE_INPUT_TILED_NOTE
        if not row.status:
            row.status = "ok" if row.passed else "outside the limit"
            if case.limit is not None:
                row.status += f" (|ΔPSNR| <= {case.limit:g} dB: the export's INT8 budget)"
    return row


def load_split(root: str | Path, split: str = "test", limit: int | None = None,
               failed: dict[str, str] | None = None):
    """(pairs iterator of (name, blur, sharp) tensors, count) of a data set split (train package's loader).

    A pair that cannot be read, whose sizes differ or that is below the 11x11 SSIM window is skipped and
    recorded in ``failed`` (blur file -> one-line reason), so one bad file does not stop the comparison.
    """
    from nafnet_core.data import load_pairs

    splits = load_pairs(root)
    if split not in splits:
        raise UserError(f"{root}: no split {split!r}; it has {', '.join(splits)}")
    pairs = splits[split][:limit] if limit else splits[split]
    failed = {} if failed is None else failed

    def gen():
        for p in pairs:
            try:
                blur, sharp = to_tensor(read_image(p.blur)), to_tensor(read_image(p.sharp))
                if blur.shape != sharp.shape:
                    raise UserError(f"{p.blur}: size {blur.shape[-1]}x{blur.shape[-2]} differs from its partner "
                                    f"{p.sharp} ({sharp.shape[-1]}x{sharp.shape[-2]})")
                if min(blur.shape[-2:]) < nc.metrics.SSIM_WINDOW:
                    raise UserError(f"{p.blur}: {blur.shape[-1]}x{blur.shape[-2]} is too small to score (SSIM needs "
                                    f"at least {nc.metrics.SSIM_WINDOW}x{nc.metrics.SSIM_WINDOW} pixels)")
            except UserError as e:
                failed[str(p.blur)] = str(e)
                continue
            yield p.name, blur, sharp

    return gen(), len(pairs)


def check_parity(export_dir: str | Path, data_root: str | Path, *, split: str = "test", limit: int | None = None,
                 checkpoint: str | Path | None = None, torch_precisions: Sequence[str] = ("fp16", "bf16"),
                 tile: tuple[int, int] | None = None, overlap: int | None = None,
                 device: str = "cpu", threads: int | None = None, progress: bool = True,
                 verify: bool = True, reuse_memory: bool = False) -> ParityReport:
    """The ``parity`` command: verifies the export's files (sha256; ``verify=False`` skips it), then runs every
    row on the split. ``reuse_memory``: the PyTorch rows keep freed memory in the process (see ``TorchRunner``).
    An AdaRevD export has rows of its own: :func:`runtime.adarevd.check_adarevd_parity`."""
    info = read_export(export_dir, verify_files=verify)
    if checkpoint is not None:
        info.checkpoint, info.checkpoint_note = Path(checkpoint), ""
    ref, cases = parity_cases(info, torch_precisions=torch_precisions, tile=tile, device=device, threads=threads,
                              verify=verify, reuse_memory=reuse_memory)
    failed: dict[str, str] = {}
    pairs, n = load_split(data_root, split, limit, failed)
    report = run_parity(ref, cases, pairs, overlap=overlap, progress=progress, total=n)
    report.failed = failed
    report.export_dir = str(export_dir)
    return report
