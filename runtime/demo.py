"""The whole job in one command on a CPU: synthetic data -> train ``tiny`` -> export -> parity -> infer.

Every stage is the library call its own command makes; the demo only chains them and prints where
everything went. It needs nothing from the network (the data set is rendered from photos that
scikit-image ships).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from nafnet_core.errors import UserError

#: Fixed tile of the demo's static graphs: the synthetic images are 192x256, so a 128 tile really tiles.
DEMO_TILE = (128, 128)


@dataclass
class DemoResult:
    out: Path
    stages: list[tuple[str, str, float]] = field(default_factory=list)  # (stage, result, seconds)
    parity_passed: bool = False
    infer_ok: bool = False

    @property
    def ok(self) -> bool:
        return self.parity_passed and self.infer_ok

    def table(self) -> str:
        width = max(len(s) for s, _, _ in self.stages)
        lines = [f"{'stage':<{width}}  {'seconds':>7}  result", f"{'-' * width}  {'-' * 7}  {'-' * 6}"]
        lines += [f"{s:<{width}}  {sec:>7.1f}  {r}" for s, r, sec in self.stages]
        lines.append(f"{'PASS' if self.ok else 'FAIL'}: everything is under {self.out}")
        return "\n".join(lines)


def run_demo(out: str | Path = "runs/demo", *, steps: int | None = None, seed: int = 0, overwrite: bool = False,
             progress: bool = True, echo=print) -> DemoResult:
    """Runs the demo into ``out``; returns what each stage produced.

    Args:
        out: output directory (``data`` link, ``train/``, ``export/``, ``parity.json``, ``deblurred/``).
        steps: training steps (default: the ``tiny`` training preset's).
        seed: synthetic data and training seed.
        overwrite: start over if ``out`` holds a previous demo (default: refuse).
        progress: progress bars on stderr.
        echo: where stage headlines go.
    """
    from export import export_model
    from train.config import build_config
    from train.loop import train
    from train.synth import ensure_synthetic

    from .infer import infer_path
    from .models import open_runner
    from .parity import check_parity
    from .trt import tensorrt_available

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"{out}: already holds a demo run; pass --overwrite to redo it or --out elsewhere")
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    result = DemoResult(out)

    def stage(name: str):
        echo(f"== {name}")
        return time.perf_counter()

    t = stage("data: embedded synthetic camera-shake set")
    data = ensure_synthetic(seed=seed, progress=progress)
    result.stages.append(("data", str(data), time.perf_counter() - t))

    t = stage("train: tiny preset on CPU")
    sets = {"seed": seed, "synth_seed": seed}
    if steps is not None:
        sets["steps"] = steps
    cfg = build_config("tiny", sets=sets)
    run = train(cfg, out / "train", progress=progress, device="cpu")
    if run.status == "interrupted":
        raise UserError(f"training was interrupted at step {run.step}; re-run the demo with --overwrite")
    ckpt = out / "train" / "best.pt"
    if not ckpt.exists():
        ckpt = out / "train" / "last.pt"
    result.stages.append(("train", f"{ckpt} (val PSNR {run.best_psnr:.2f} dB at step {run.best_step})",
                          time.perf_counter() - t))

    t = stage("export: ONNX fp32 + FP16, dynamic and fixed tile" + (" + TensorRT" if tensorrt_available()[0] else ""))
    trt_ok, trt_why = tensorrt_available()
    manifest = export_model(ckpt, out / "export", tiles=[DEMO_TILE], dynamic=True, fp16=True, trt=trt_ok,
                            progress=progress)
    names = ", ".join(manifest.artifacts)
    result.stages.append(("export", f"{out / 'export'} ({names})" + ("" if trt_ok else f"; no engine: {trt_why}"),
                          time.perf_counter() - t))

    t = stage("parity: every backend vs PyTorch fp32 on the synthetic test split")
    report = check_parity(out / "export", data, split="test", progress=progress)
    report.write_json(out / "parity.json")
    echo(report.table())
    result.parity_passed = report.passed
    ran = [r for r in report.rows if r.passed is not None]
    result.stages.append(("parity", f"{out / 'parity.json'}: {'PASS' if report.passed else 'FAIL'} "
                          f"({sum(bool(r.passed) for r in ran)}/{len(ran)} rows passed, "
                          f"{len(report.rows) - len(ran) - 1} could not run here)", time.perf_counter() - t))

    t = stage("infer: deblur the test blur folder with the fastest backend here")
    blur_dir = _blur_folder(data)
    with open_runner(out / "export", "auto") as runner:
        rep = infer_path(runner, blur_dir, out / "deblurred", compare=True, progress=progress)
        name = runner.name
    result.infer_ok = rep.ok and bool(rep.written)
    result.stages.append(("infer", f"{out / 'deblurred'} ({len(rep.written)} images, {name}; side by side in "
                          f"{out / 'deblurred_compare'})", time.perf_counter() - t))
    return result


def _blur_folder(root: Path) -> Path:
    for cand in (root / "test" / "blur", root / "test"):
        if cand.is_dir():
            return cand
    raise UserError(f"{root}: no test/blur folder in the synthetic set")
