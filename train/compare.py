"""The experiment table: training runs side by side (``python cli.py compare runs/*``).

Everything comes from files a run already leaves behind, so runs made by any version of the project
compare (a file that is missing is a ``-`` cell, never an error):

- ``config.json``: the training config; the table lists only the keys whose values differ between runs.
  Keys a run predates take their current defaults first, so an old run differs only where it really did.
- the model config (preset + ``model_args`` of ``config.json``, resolved to every architecture field with
  the defaults of fields added later, e.g. ``block`` and ``input_fft``): the fields that differ are listed
  as ``model.<field>`` (``model.input_fft=fs``) in place of the raw ``model_args``; parameters and GFLOP at
  256x256 and 720x1280 (the exported form: DFT matrices counted), on the meta device (no weights loaded).
- ``metrics.csv``: the best validation PSNR/SSIM (with the blurry input's on the same images) and the
  median training throughput.
- eval JSON files in the run directory (``python cli.py eval RUN/best.pt --json RUN/test.json``): the test
  split with TLC.
- AdaRevD runs: the PSNR of each exit depth, of the adaptive result and the shares of tiles that left at
  each depth 0..K (the exit histogram), of the best validation (``best_val.json``, written by training
  beside ``best.pt``) and of the test eval JSON. These columns appear only when some run has them.
- an export of this run's ``best.pt`` (a folder with ``manifest.json`` inside the run directory, beside
  it, or under ``./exported``, matched by the checkpoint's sha256) and a ``bench --json`` result inside
  that export folder: the onnxruntime fp32 latency at 720x1280.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nafnet_core.errors import UserError

#: The benchmark size of the latency column (a GoPro frame).
LATENCY_SIZE = "720x1280"
#: Training-config keys that never describe the experiment (paths and bookkeeping).
IGNORED_KEYS = ("data_root", "world_size", "workers", "log_every", "save_every", "cache")


@dataclass
class RunSummary:
    """One row of the table (``None``: not recorded for this run)."""

    run: str
    model: str | None = None
    differs: dict[str, Any] = field(default_factory=dict)
    parameters: int | None = None
    gflop_256: float | None = None
    gflop_720p: float | None = None
    best_val_psnr: float | None = None
    best_val_ssim: float | None = None
    best_step: int | None = None
    val_input_psnr: float | None = None
    val_input_ssim: float | None = None
    test_psnr: float | None = None
    test_ssim: float | None = None
    test_input_psnr: float | None = None
    train_images_per_s: float | None = None
    export: str | None = None
    onnxrt_720p_ms: float | None = None
    # AdaRevD: PSNR of exit depths 1..K, of the adaptive result, and % of tiles leaving at depths 0..K
    val_depth_psnr: list[float | None] | None = None
    val_adaptive_psnr: float | None = None
    val_exit_shares: list[float] | None = None
    test_depth_psnr: list[float | None] | None = None
    test_adaptive_psnr: float | None = None
    test_exit_shares: list[float] | None = None


#: The AdaRevD fields of :class:`RunSummary` (listed only when some run has them), by split.
DEPTH_FIELDS = {split: (f"{split}_depth_psnr", f"{split}_adaptive_psnr", f"{split}_exit_shares")
                for split in ("val", "test")}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _float(text: Any) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """``RUN/config.json`` as a dict; a folder without one is not a run (one line naming it)."""
    path = run_dir / "config.json"
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: not a directory; give run directories such as runs/tiny")
    data = _read_json(path) if path.is_file() else None
    if not isinstance(data, dict):
        raise UserError(f"{run_dir}: not a training run (no readable config.json); give folders written by "
                        "`python cli.py train`")
    return data


def _with_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` over the current training defaults: a key the run predates reads as its default."""
    from .config import TrainConfig

    return TrainConfig().to_dict() | config


def _model_config(config: dict[str, Any]):
    """The run's :class:`~nafnet_core.config.ModelConfig` (as ``train`` builds it), or None for a preset or
    option this version does not know."""
    from nafnet_core.config import get_config

    overrides = dict(config.get("model_args") or {})
    if config.get("dropout"):
        overrides["drop_out_rate"] = config["dropout"]
    try:
        return get_config(config.get("model", "nafnet-gopro-width32"), **overrides)
    except (KeyError, ValueError, TypeError):
        return None


def _model_cost(cfg) -> tuple[int | None, float | None, float | None]:
    """Parameters and GFLOP at 256x256 and 720x1280 of ``cfg`` (a ModelConfig or None), on the meta device."""
    import torch

    from nafnet_core.family import build_model
    from nafnet_core.flops import model_gflops
    from nafnet_core.model import count_parameters

    if cfg is None:
        return None, None, None  # a preset this version does not know
    with torch.device("meta"):
        params = count_parameters(build_model(cfg))  # NAFNet, or AdaRevD (GFLOP: every tile at depth K)
    return params, round(model_gflops(cfg, 256, 256), 2), round(model_gflops(cfg, 720, 1280), 1)


def _metrics(run_dir: Path, row: RunSummary) -> None:
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    vals = [r for r in rows if r.get("kind") == "val" and _float(r.get("val_psnr")) is not None]
    if vals:
        best = max(vals, key=lambda r: _float(r["val_psnr"]))
        row.best_val_psnr, row.best_val_ssim = _float(best["val_psnr"]), _float(best.get("val_ssim"))
        row.val_input_psnr, row.val_input_ssim = _float(best.get("val_input_psnr")), _float(best.get("val_input_ssim"))
        row.best_step = int(best["step"]) if str(best.get("step", "")).isdigit() else None
    speeds = [v for r in rows if r.get("kind") == "train" and (v := _float(r.get("images_per_s"))) is not None]
    if speeds:
        row.train_images_per_s = round(statistics.median(speeds), 2)


def _depths(data: Any, row: RunSummary, split: str) -> None:
    """AdaRevD's figures in an eval summary (``heads``: depths 1..K then the adaptive result; ``exit_histogram``:
    tiles per depth 0..K) into the ``split`` fields of ``row``; nothing for another model or a malformed file."""
    heads, hist = (data.get("heads"), data.get("exit_histogram")) if isinstance(data, dict) else (None, None)
    if not (isinstance(heads, list) and isinstance(hist, list) and len(heads) == len(hist) >= 2
            and all(isinstance(h, dict) for h in heads) and all(_float(n) is not None for n in hist)):
        return
    psnrs = [_float(h.get("psnr")) for h in heads]
    total = sum(float(n) for n in hist) or 1.0
    depth_psnr, adaptive, shares = DEPTH_FIELDS[split]
    setattr(row, depth_psnr, psnrs[:-1])
    setattr(row, adaptive, psnrs[-1])
    setattr(row, shares, [round(100 * float(n) / total, 2) for n in hist])


def _test_eval(run_dir: Path, row: RunSummary) -> None:
    """The newest eval JSON in the run directory that scored the test split with TLC."""
    found = []
    for path in run_dir.glob("*.json"):
        data = _read_json(path)
        if isinstance(data, dict) and data.get("split") == "test" and data.get("tlc") and "psnr" in data:
            found.append((path.stat().st_mtime, data))
    if found:
        data = max(found, key=lambda t: t[0])[1]
        row.test_psnr, row.test_ssim = _float(data.get("psnr")), _float(data.get("ssim"))
        row.test_input_psnr = _float(data.get("input_psnr"))
        _depths(data, row, "test")


def _best_val(run_dir: Path, row: RunSummary) -> None:
    """``best_val.json``: the validation ``best.pt`` was saved at (its AdaRevD figures)."""
    path = run_dir / "best_val.json"
    if path.is_file():
        _depths(_read_json(path), row, "val")


def _export_of(run_dir: Path) -> Path | None:
    """An export folder whose manifest names this run's best.pt (or last.pt) by sha256."""
    from nafnet_core.fileio import sha256_file

    digests = {sha256_file(p) for p in (run_dir / "best.pt", run_dir / "last.pt") if p.is_file()}
    if not digests:
        return None
    candidates = [*run_dir.glob("*/manifest.json"), *run_dir.parent.glob("*/manifest.json"),
                  *Path("exported").glob("*/manifest.json")]
    for manifest in sorted(set(candidates)):
        data = _read_json(manifest)
        source = data.get("source") if isinstance(data, dict) else None
        if isinstance(source, dict) and source.get("sha256") in digests:
            return manifest.parent
    return None


def _latency(export_dir: Path) -> float | None:
    """Fastest onnxruntime fp32 median at 720x1280 among the ``bench --json`` results in the export folder."""
    best = None
    for path in export_dir.glob("*.json"):
        data = _read_json(path)
        if not (isinstance(data, dict) and isinstance(data.get("rows"), list)):
            continue
        for r in data["rows"]:
            if (isinstance(r, dict) and r.get("backend") == "onnxrt" and r.get("precision") == "fp32"
                    and r.get("size") == LATENCY_SIZE and _float(r.get("median_ms")) is not None):
                best = min(best or math.inf, _float(r["median_ms"]))
    return best


def _differing(dicts: list[dict[str, Any]], keys: list[str]) -> list[str]:
    """The ``keys`` whose values are not the same in every dict (a missing key counts as a value)."""
    missing = object()
    return [k for k in keys if len({json.dumps(d.get(k, missing), sort_keys=True, default=str) for d in dicts}) > 1]


def expand_studies(paths: list[Path]) -> list[Path]:
    """A study folder of ``tune`` (it holds ``study.journal``) stands for its ``trial-*`` runs; the plain files
    a shell glob such as ``runs/STUDY/*`` adds beside them (the journal, plots, ``best.yaml``) are left out."""
    out = []
    for p in paths:
        if p.is_dir() and (p / "study.journal").is_file() and not (p / "config.json").exists():
            out += sorted(d for d in p.glob("trial-*") if (d / "config.json").is_file())
        elif p.is_file() and len(paths) > 1:
            continue
        else:
            out.append(p)
    return out


def summarize_runs(run_dirs: list[str | Path]) -> list[RunSummary]:
    """One :class:`RunSummary` per run directory, with the config keys that differ between them."""
    if not run_dirs:
        raise UserError("no run directories given; e.g. python cli.py compare runs/*")
    dirs = expand_studies([Path(d) for d in run_dirs])
    configs = [_with_defaults(read_run_config(d)) for d in dirs]
    models = [_model_config(c) for c in configs]
    resolved = all(m is not None for m in models)
    # the architecture as fields: model_args is then redundant (model.<field> says what it changed)
    skip = set(IGNORED_KEYS) | {"model"} | ({"model_args"} if resolved else set())
    keys = sorted({k for c in configs for k in c} - skip)
    differing = _differing(configs, keys)
    model_dicts = [m.to_dict() if m is not None else {} for m in models]
    model_differing = _differing(model_dicts, sorted({k for m in model_dicts for k in m})) if resolved else []
    names = [d.name if [x.name for x in dirs].count(d.name) == 1 else str(d) for d in dirs]
    rows = []
    for d, name, config, cfg, mdict in zip(dirs, names, configs, models, model_dicts):
        row = RunSummary(run=name, model=config.get("model"),
                         differs={**{k: config.get(k) for k in differing},
                                  **{f"model.{k}": mdict.get(k) for k in model_differing}})
        row.parameters, row.gflop_256, row.gflop_720p = _model_cost(cfg)
        _metrics(d, row)
        _best_val(d, row)
        _test_eval(d, row)
        export_dir = _export_of(d)
        if export_dir is not None:
            row.export = str(export_dir)
            row.onnxrt_720p_ms = _latency(export_dir)
        rows.append(row)
    return rows


def _cell(value: Any, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def _pair(a: float | None, b: float | None, fa: str, fb: str) -> str:
    return "-" if a is None else f"{a:{fa}} / {_cell(b, fb)}"


def _differs_text(differs: dict[str, Any]) -> str:
    return " ".join(f"{k}={json.dumps(v, separators=(',', ':')) if not isinstance(v, str) else v}"
                    for k, v in differs.items()) or "-"


def _series(values: list[float | None] | None, spec: str) -> str:
    """``a/b/c`` of a per-depth list (``-`` for a missing one)."""
    return "-" if values is None else "/".join(_cell(v, spec) for v in values)


def depth_splits(rows: list[RunSummary]) -> list[str]:
    """The splits (``val``, ``test``) some run has AdaRevD figures of."""
    return [s for s, (psnrs, _, _) in DEPTH_FIELDS.items() if any(getattr(r, psnrs) is not None for r in rows)]


def compare_table(rows: list[RunSummary]) -> str:
    """The plain-text experiment table (one line per run); with an AdaRevD run, also the PSNR of each exit depth,
    the adaptive PSNR and the exit histogram (% of tiles leaving at depth 0..K), of the best validation and of
    the test eval."""
    from nafnet_core.cli_common import text_table

    splits = depth_splits(rows)
    label = {"val": "best val", "test": "test (TLC)"}
    head = ["run", "model", "params", "GFLOP 256²", "GFLOP 720p", "best val PSNR/SSIM", "@step",
            "input val", "test PSNR/SSIM (TLC)"]
    head += [h for s in splits for h in (f"{label[s]} PSNR @depth 1..K", f"{label[s]} adaptive",
                                         f"{label[s]} exits % @0..K")]
    head += ["img/s", "ORT 720p s", "config differs"]
    body = []
    for r in rows:
        line = [r.run, _cell(r.model), _cell(r.parameters, ","), _cell(r.gflop_256, ".2f"), _cell(r.gflop_720p, ".1f"),
                _pair(r.best_val_psnr, r.best_val_ssim, ".2f", ".4f"), _cell(r.best_step),
                _pair(r.val_input_psnr, r.val_input_ssim, ".2f", ".4f"), _pair(r.test_psnr, r.test_ssim, ".2f", ".4f")]
        for s in splits:
            psnrs, adaptive, shares = (getattr(r, f) for f in DEPTH_FIELDS[s])
            line += [_series(psnrs, ".2f"), _cell(adaptive, ".2f"), _series(shares, ".0f")]
        line += [_cell(r.train_images_per_s, ".2f"),
                 "-" if r.onnxrt_720p_ms is None else f"{r.onnxrt_720p_ms / 1e3:.2f}", _differs_text(r.differs)]
        body.append(line)
    return text_table(head, body)


def _fields(rows: list[RunSummary]) -> list[str]:
    """The :class:`RunSummary` fields of the JSON and CSV: all but the AdaRevD ones no run has."""
    present = {f for s in depth_splits(rows) for f in DEPTH_FIELDS[s]}
    absent = {f for fields in DEPTH_FIELDS.values() for f in fields} - present
    return [f for f in RunSummary.__dataclass_fields__ if f not in absent]


def rows_as_dicts(rows: list[RunSummary]) -> list[dict[str, Any]]:
    fields = _fields(rows)
    return [{k: v for k, v in asdict(r).items() if k in fields} for r in rows]


def compare_csv(rows: list[RunSummary]) -> str:
    """CSV: one column per :class:`RunSummary` field (the AdaRevD ones when some run has them); ``differs`` as
    ``key=value`` text, a per-depth list as ``a/b/c``."""
    from .report import csv_text

    dicts = rows_as_dicts(rows)
    for d in dicts:
        d["differs"] = _differs_text(d["differs"])
        for s in depth_splits(rows):
            psnrs, _, shares = DEPTH_FIELDS[s]
            for k in (psnrs, shares):
                d[k] = None if d[k] is None else "/".join("" if v is None else format(v, ".6g") for v in d[k])
    return csv_text(_fields(rows), dicts, ".6g")
