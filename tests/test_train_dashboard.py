"""TensorBoard logging of training: the event files, read back with tensorboard's own reader,
hold exactly the steps and values of metrics.csv, also across resumes after an attempt that logged past its
last checkpoint; the optional dependency and the config key."""

from __future__ import annotations

import csv
import io
import shutil
import sys

import numpy as np
import pytest

from tests.reliability_cases import make_dataset
from train.config import build_config
from train.dashboard import SAMPLES_TAG, SCALAR_TAGS

pytest.importorskip("tensorboard", reason="the tensorboard package (extra [tensorboard]) is not installed")


def _cfg(root, **kw):
    sets = {"data": str(root), "steps": 12, "crop": 32, "batch": 2, "val_every": 6, "save_every": 3, "log_every": 1,
            "val_max": 1, "workers": 0, "dropout": 0.1}
    return build_config("tiny", sets={**sets, **kw})


def _events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})  # 0 = keep every point
    acc.Reload()
    return acc


def _metrics(run_dir) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_event_files_match_metrics_csv_across_resumes(tmp_path):
    """Three processes' worth of event files: steps 1-5 (stopped, last.pt at 5), 6-9 (then last.pt is put
    back to step 5, as if that attempt was killed after logging step 9 but before saving), 6-12. TensorBoard
    must show steps 1..12 once each with metrics.csv's values; without the purge on resume steps 6-9 (and
    the validation at 6) would appear twice."""
    from train.loop import train

    root = make_dataset(tmp_path / "ds", [], n_good=4)
    cfg, run = _cfg(root), tmp_path / "run"
    train(cfg, run, progress=False, stop_at=5)
    shutil.copy(run / "last.pt", tmp_path / "last5.pt")
    train(cfg, run, progress=False, resume=True, stop_at=9)
    shutil.copy(tmp_path / "last5.pt", run / "last.pt")
    result = train(cfg, run, progress=False, resume=True)
    assert result.status == "done" and result.step == 12
    assert len(list(run.glob("events.out.tfevents.*"))) == 3

    acc, rows = _events(run), _metrics(run)
    assert set(SCALAR_TAGS.values()) <= set(acc.Tags()["scalars"])
    for column, tag in SCALAR_TAGS.items():
        want = [(int(r["step"]), float(r[column])) for r in rows if r[column] != ""]
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in want], tag  # the same steps, each once
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-5), tag  # csv keeps 6 digits
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 13))
    assert [e.step for e in acc.Scalars("val/psnr")] == [6, 12]
    assert acc.Scalars("val/psnr")[-1].value == pytest.approx(result.last_val["psnr"], rel=1e-6)
    assert acc.Scalars("val/input_psnr")[-1].value == pytest.approx(result.last_val["input_psnr"], rel=1e-6)

    # The sample images: blur | output | sharp, the same pixels as samples.png of the last validation.
    from PIL import Image

    images = acc.Images(SAMPLES_TAG)
    assert [im.step for im in images] == [6, 12]
    last = np.asarray(Image.open(io.BytesIO(images[-1].encoded_image_string)).convert("RGB"))
    assert np.array_equal(last, np.asarray(Image.open(run / "samples.png").convert("RGB")))
    w, h = Image.open(root / "test" / "blur" / "a1.png").size  # the one validation image (val_max=1)
    assert last.shape == (h + 4, 3 * w, 3)


def test_off_writes_no_event_files_and_on_without_the_package_stops_before_any_work(tmp_path, monkeypatch):
    from nafnet_core.errors import UserError
    from train.dashboard import summary_writer_class
    from train.loop import train

    root = make_dataset(tmp_path / "ds", [], n_good=2)
    result = train(_cfg(root, steps=2, val_every=2, tensorboard="off"), tmp_path / "off", progress=False)
    assert result.status == "done" and (tmp_path / "off" / "metrics.csv").is_file()
    assert not list((tmp_path / "off").glob("events.out.tfevents.*"))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were missing
    assert summary_writer_class("auto") is None and summary_writer_class("off") is None
    with pytest.raises(UserError, match=r"^tensorboard=on needs the tensorboard package: pip install tensorboard"):
        train(_cfg(root, tensorboard="on"), tmp_path / "on", progress=False)
    assert not (tmp_path / "on").exists()  # stopped before the data check wrote config.json and the splits
    from train.config import ConfigError

    with pytest.raises(ConfigError, match="tensorboard must be one of auto, on, off"):
        _cfg(root, tensorboard="yes please")
