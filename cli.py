#!/usr/bin/env python
"""NAFNet-Deblurring command line: ``python cli.py --help`` (``nafnet --help`` after ``pip install``).

Each command lives beside the code it drives (``<package>/commands.py``) and only parses and calls. The demo
lives here: it drives every stage (synthetic data, training, export, parity, inference), so it sits above
all the packages, beside the command line.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from export.commands import export
from nafnet_core import __version__
from nafnet_core.cli_common import Group
from nafnet_core.commands import info
from nafnet_core.errors import UserError
from runtime.commands import bench, infer, parity, serve
from train.commands import compare_cmd, data, eval_cmd, train_cmd
from train.tune_commands import tune

# ----------------------------------------------------------------------------------------------------
# The demo: the whole job in one command on a CPU (synthetic data -> train -> export -> parity -> infer).
# Every stage is the library call its own command makes; the demo only chains them and prints where
# everything went. It needs nothing from the network (the data set is rendered from photos that
# scikit-image ships) and ends with how much sharper the deblurred test images are than the blurry inputs
# (mean PSNR gain) and one labelled blurry | deblurred | sharp image to open.

#: The one graph shape the demo exports: a fixed tile (the synthetic images are 192x256, so a 128 tile really
#: tiles). No dynamic graph: its export took ~99 s of the 4-minute budget on an idle machine, the tile's
#: a few seconds, and that time trains instead (BENCHMARKS.md, "Demo").
#: ``python cli.py export runs/demo/train/best.pt --dynamic --fp16`` writes the dynamic graphs afterwards.
DEMO_TILE = (128, 128)
#: The demo's training preset (train/config.py): the `tiny` model with the best recipe measured for the demo.
DEMO_PRESET = "demo"
#: The comparison image the demo ends with, inside its output folder.
COMPARISON_NAME = "comparison.png"


@dataclass
class TestGain:
    """PSNR of the deblurred test-split files and of their blurry inputs, per image (dB)."""

    rows: list[tuple[str, float, float]]  # (name, blurry input PSNR, deblurred PSNR)

    @property
    def input_psnr(self) -> float:
        return sum(r[1] for r in self.rows) / len(self.rows)

    @property
    def psnr(self) -> float:
        return sum(r[2] for r in self.rows) / len(self.rows)

    @property
    def gain(self) -> float:
        """Mean over the images of (deblurred - blurry input) PSNR."""
        return self.psnr - self.input_psnr


@dataclass
class DemoResult:
    out: Path
    stages: list[tuple[str, str, float]] = field(default_factory=list)  # (stage, result, seconds)
    parity_passed: bool = False
    infer_ok: bool = False
    test: TestGain | None = None
    comparison: Path | None = None
    comparison_caption: str = ""

    @property
    def ok(self) -> bool:
        return self.parity_passed and self.infer_ok

    def table(self) -> str:
        width = max(len(s) for s, _, _ in self.stages)
        lines = [f"{'stage':<{width}}  {'seconds':>7}  result", f"{'-' * width}  {'-' * 7}  {'-' * 6}"]
        lines += [f"{s:<{width}}  {sec:>7.1f}  {r}" for s, r, sec in self.stages]
        lines.append(f"{'PASS' if self.ok else 'FAIL'}: everything is under {self.out}")
        if self.test is not None:
            lines.append(f"test gain: {self.test.gain:+.2f} dB (deblurred {self.test.psnr:.2f} dB vs blurry input "
                         f"{self.test.input_psnr:.2f} dB, mean of the {len(self.test.rows)} test images)")
        if self.comparison is not None:
            lines.append(f"open this: {self.comparison} ({self.comparison_caption})")
        return "\n".join(lines)


def run_demo(out: str | Path = "runs/demo", *, steps: int | None = None, seed: int = 0,
             sets: dict[str, Any] | None = None, overwrite: bool = False, progress: bool = True,
             echo=print) -> DemoResult:
    """Runs the demo into ``out``; returns what each stage produced.

    Args:
        out: output directory (``train/``, ``export/``, ``parity.json``, ``deblurred/``, ``comparison.png``).
        steps: training steps (default: the ``demo`` training preset's).
        seed: synthetic data and training seed.
        sets: overrides of the ``demo`` training preset's keys (``--set``), e.g. ``{"synth_count": 6}``.
        overwrite: start over if ``out`` holds a previous demo (default: refuse).
        progress: progress bars on stderr.
        echo: where stage headlines go.
    """
    from export import export_model
    from nafnet_core.synth import ensure_synthetic
    from runtime.infer import infer_path
    from runtime.models import open_runner
    from runtime.parity import check_parity
    from runtime.trt import tensorrt_available
    from train.config import build_config
    from train.loop import train

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

    overrides = {"seed": seed, "synth_seed": seed, **(sets or {})}
    if steps is not None:
        overrides["steps"] = steps
    cfg = build_config(DEMO_PRESET, sets=overrides)

    t = stage("data: embedded synthetic camera-shake set")
    data = ensure_synthetic(seed=cfg.synth_seed, count=cfg.synth_count, progress=progress, shake=cfg.synth_shake)
    result.stages.append(("data", str(data), time.perf_counter() - t))

    t = stage(f"train: {DEMO_PRESET} preset on CPU")
    run = train(cfg, out / "train", progress=progress, device="cpu")
    if run.status == "interrupted":
        raise UserError(f"training was interrupted at step {run.step}; re-run the demo with --overwrite")
    ckpt = out / "train" / "best.pt"
    if not ckpt.exists():
        ckpt = out / "train" / "last.pt"
    result.stages.append(("train", f"{ckpt} (val PSNR {run.best_psnr:.2f} dB at step {run.best_step})",
                          time.perf_counter() - t))

    tile = "x".join(map(str, DEMO_TILE))
    t = stage(f"export: ONNX fp32 + FP16, fixed {tile} tile" + (" + TensorRT" if tensorrt_available()[0] else ""))
    trt_ok, trt_why = tensorrt_available()
    manifest = export_model(ckpt, out / "export", tiles=[DEMO_TILE], dynamic=False, fp16=True, trt=trt_ok,
                            progress=progress)
    names = ", ".join(manifest.artifacts)
    result.stages.append(("export", f"{out / 'export'} ({names})" + ("" if trt_ok else f"; no engine: {trt_why}"),
                          time.perf_counter() - t))

    t = stage("parity: every backend vs PyTorch fp32 on the synthetic test split")
    report = check_parity(out / "export", data, split="test", progress=progress, reuse_memory=True)
    report.write_json(out / "parity.json")
    echo(report.table())
    result.parity_passed = report.passed
    ran = [r for r in report.rows if r.passed is not None]
    result.stages.append(("parity", f"{out / 'parity.json'}: {'PASS' if report.passed else 'FAIL'} "
                          f"({sum(bool(r.passed) for r in ran)}/{len(ran)} rows passed, "
                          f"{len(report.rows) - len(ran) - 1} could not run here)", time.perf_counter() - t))

    t = stage("infer: deblur the test blur folder with the fastest backend here")
    blur_dir = _blur_folder(data)
    with open_runner(out / "export", "auto", reuse_memory=True) as runner:
        rep = infer_path(runner, blur_dir, out / "deblurred", compare=True, progress=progress)
        name = runner.name
    result.infer_ok = rep.ok and bool(rep.written)
    result.stages.append(("infer", f"{out / 'deblurred'} ({len(rep.written)} images, {name}; side by side in "
                          f"{out / 'deblurred_compare'})", time.perf_counter() - t))

    t = stage("result: deblurred test images vs their blurry inputs")
    if result.infer_ok:
        result.test = score_test_split(data, blur_dir, out / "deblurred")
        result.comparison, result.comparison_caption = write_comparison(data, blur_dir, out / "deblurred",
                                                                        result.test, out / COMPARISON_NAME)
        result.stages.append(("result", f"test gain {result.test.gain:+.2f} dB; {result.comparison}",
                              time.perf_counter() - t))
    return result


def _test_pairs(data: Path, blur_dir: Path, deblurred: Path):
    """(pair, deblurred file) of every test-split pair; infer mirrors ``blur_dir``'s tree into ``deblurred``."""
    from nafnet_core.data import load_pairs

    pairs = load_pairs(data)["test"]
    if not pairs:
        raise UserError(f"{data}: the test split is empty; the demo needs at least 2 test pairs")
    return [(p, deblurred / p.blur.relative_to(blur_dir)) for p in pairs]


def score_test_split(data: Path, blur_dir: Path, deblurred: Path) -> TestGain:
    """PSNR of each deblurred test-split file and of its blurry input against the sharp image.

    Args:
        data: the data set root (its test split: the second half of the test folder).
        blur_dir: the folder that was deblurred (``data/test/blur``).
        deblurred: the output folder of ``infer`` for ``blur_dir``.
    """
    import torch

    from nafnet_core.images import read_rgb8
    from nafnet_core.metrics import psnr

    def db(a, b) -> float:
        return float(psnr(torch.from_numpy(a).permute(2, 0, 1), torch.from_numpy(b).permute(2, 0, 1))[0])

    rows = []
    for pair, out_path in _test_pairs(data, blur_dir, deblurred):
        if not out_path.exists():
            raise UserError(f"{out_path}: no deblurred image for test pair {pair.blur}; "
                            "re-run the demo with --overwrite")
        sharp = read_rgb8(pair.sharp)
        rows.append((pair.name, db(read_rgb8(pair.blur), sharp), db(read_rgb8(out_path), sharp)))
    return TestGain(rows)


def write_comparison(data: Path, blur_dir: Path, deblurred: Path, test: TestGain, path: Path) -> tuple[Path, str]:
    """Writes blurry | deblurred | sharp (labelled, enlarged 2x) of the test image with the largest gain.

    Returns the path and a one-line description of the image.

    Args:
        data / blur_dir / deblurred: as for :func:`score_test_split`.
        test: its result (picks the image).
        path: the PNG to write (atomically).
    """
    from nafnet_core.images import read_rgb8, write_rgb8
    from train.report import labelled_row

    name, before, after = max(test.rows, key=lambda r: r[2] - r[1])
    pair, out_path = next(po for po in _test_pairs(data, blur_dir, deblurred) if po[0].name == name)
    row = labelled_row([(f"blurry input  {before:.2f} dB", read_rgb8(pair.blur)),
                        (f"deblurred  {after:.2f} dB ({after - before:+.2f})", read_rgb8(out_path)),
                        ("sharp (ground truth)", read_rgb8(pair.sharp))])
    write_rgb8(path, row)
    return path, (f"blurry | deblurred | sharp, test image {name}, {after - before:+.2f} dB: the largest gain of the "
                  f"{len(test.rows)} test images")


def _blur_folder(root: Path) -> Path:
    for cand in (root / "test" / "blur", root / "test"):
        if cand.is_dir():
            return cand
    raise UserError(f"{root}: no test/blur folder in the synthetic set")


@click.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/demo"),
              show_default=True,
              help="Where everything goes (train/, export/, parity.json, deblurred/, comparison.png).")
@click.option("--steps", type=click.IntRange(1), default=None,
              help="Training steps (default: the demo training preset's).")
@click.option("--seed", type=int, default=0, show_default=True, help="Synthetic data and training seed.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override one key of the demo training preset (repeatable), as train --set, "
                   "e.g. --set synth_count=6.")
@click.option("--overwrite", is_flag=True, help="Redo a previous demo in --out.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def demo(out_dir: Path, steps: int | None, seed: int, sets: tuple[str, ...], overwrite: bool, quiet: bool) -> None:
    """The whole job on a CPU in a few minutes: synthetic data -> train -> export -> parity -> infer.

    Renders the embedded synthetic camera-shake set, trains the demo training preset (the tiny model),
    exports ONNX fp32 + FP16 (a fixed 128x128 tile; a TensorRT engine where TensorRT exists), checks parity
    of every backend against PyTorch and deblurs the test folder. It ends with the test gain (mean PSNR
    of the deblurred test images minus that of their blurry inputs) and the path of a labelled
    blurry | deblurred | sharp image to open. Exit 0 if parity and inference passed.

    \b
    Examples:
      python cli.py demo
      python cli.py demo --out /tmp/demo --steps 200 --overwrite
      python cli.py demo --out /tmp/demo-small --set synth_count=6 --steps 5   # the chain in seconds
    """
    from train.config import parse_sets

    result = run_demo(out_dir, steps=steps, seed=seed, sets=parse_sets(sets), overwrite=overwrite, progress=not quiet,
                      echo=lambda m: click.echo(m, err=True))
    click.echo(result.table())
    sys.exit(0 if result.ok else 1)


# ----------------------------------------------------------------------------------------------------

@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="nafnet-deblurring")
def main() -> None:
    """Train NAFNet to remove motion blur, export it to ONNX / TensorRT FP16, and prove the export
    restores images as well as PyTorch.

    \b
    Example:
      python cli.py info nafnet-gopro-width32
    """


main.add_command(info)
main.add_command(demo)
main.add_command(data)
main.add_command(train_cmd)
main.add_command(eval_cmd)
main.add_command(compare_cmd)
main.add_command(tune)
main.add_command(export)
main.add_command(infer)
main.add_command(parity)
main.add_command(bench)
main.add_command(serve)

if __name__ == "__main__":
    main()
