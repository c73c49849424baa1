"""demo: the full chain is run by hand (BENCHMARKS/README); here only what is cheap to check, on real files."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from cli import main


def test_demo_refuses_to_clobber_a_previous_run(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "best.pt").write_bytes(b"x")
    res = CliRunner().invoke(main, ["demo", "--out", str(tmp_path), "-q"])
    assert res.exit_code == 1 and "--overwrite" in res.output and "Traceback" not in res.output
    assert (tmp_path / "train" / "best.pt").exists()


def test_demo_help_has_an_example():
    res = CliRunner().invoke(main, ["demo", "--help"])
    assert res.exit_code == 0 and "python cli.py demo" in res.output


def _stand_in_outputs(data, out_dir):
    """What a model that removes half the blur would write: round((blur + sharp) / 2) for every test pair."""
    from nafnet_core.images import read_rgb8, write_rgb8

    blur_dir = data / "test" / "blur"
    for f in sorted(blur_dir.iterdir()):
        mix = (read_rgb8(f).astype(np.float64) + read_rgb8(data / "test" / "sharp" / f.name)) / 2
        write_rgb8(out_dir / f.name, np.round(mix).astype(np.uint8))
    return blur_dir


def _psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0 ** 2 / mse)


@pytest.fixture(scope="module")
def small_synth(tmp_path_factory):
    """12 train + 4 test pairs of 48x64: the test split (second half of the test folder) has 2 pairs."""
    from nafnet_core.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("synth") / "data", seed=3, count=12, size=(48, 64), progress=False)


def test_test_gain_and_comparison_image_from_the_deblurred_files(small_synth, tmp_path):
    from cli import DemoResult, score_test_split, write_comparison
    from nafnet_core.images import read_rgb8

    blur_dir = _stand_in_outputs(small_synth, tmp_path / "deblurred")
    test = score_test_split(small_synth, blur_dir, tmp_path / "deblurred")

    # The scores are those of the files: the test split only (the last 2 of the 4 test pairs), PSNR vs sharp.
    assert [r[0] for r in test.rows] == ["0002.png", "0003.png"]
    for name, before, after in test.rows:
        sharp = read_rgb8(small_synth / "test" / "sharp" / name)
        assert before == pytest.approx(_psnr(read_rgb8(blur_dir / name), sharp), abs=1e-9)
        assert after == pytest.approx(_psnr(read_rgb8(tmp_path / "deblurred" / name), sharp), abs=1e-9)
    assert test.gain == pytest.approx(np.mean([a - b for _, b, a in test.rows]))
    assert 4.0 < test.gain < 8.0  # halving the error adds ~6 dB

    path, caption = write_comparison(small_synth, blur_dir, tmp_path / "deblurred", test, tmp_path / "cmp.png")
    name = max(test.rows, key=lambda r: r[2] - r[1])[0]
    assert name in caption
    img = read_rgb8(path)
    h, w, scale, gap = 48, 64, 2, 8
    assert img.shape[1] == 3 * w * scale + 2 * gap and img.shape[0] > h * scale
    band = img.shape[0] - h * scale
    assert (img[:band] < 128).any()  # captions drawn above the panels
    panels = [read_rgb8(small_synth / "test" / "blur" / name), read_rgb8(tmp_path / "deblurred" / name),
              read_rgb8(small_synth / "test" / "sharp" / name)]
    for i, panel in enumerate(panels):  # blurry | deblurred | sharp, each enlarged 2x, nearest neighbour
        x = i * (w * scale + gap)
        np.testing.assert_array_equal(img[band:, x:x + w * scale], panel.repeat(scale, 0).repeat(scale, 1))

    result = DemoResult(tmp_path, stages=[("result", "ok", 0.1)], test=test, comparison=path,
                        comparison_caption=caption)
    lines = result.table().splitlines()
    assert lines[-2].startswith(f"test gain: {test.gain:+.2f} dB")
    assert lines[-1].startswith(f"open this: {path} (blurry | deblurred | sharp")


def test_missing_deblurred_file_is_named(small_synth, tmp_path):
    from cli import score_test_split
    from nafnet_core.errors import UserError

    blur_dir = _stand_in_outputs(small_synth, tmp_path / "deblurred")
    (tmp_path / "deblurred" / "0003.png").unlink()
    with pytest.raises(UserError, match="0003.png: no deblurred image"):
        score_test_split(small_synth, blur_dir, tmp_path / "deblurred")


@pytest.mark.slow
def test_demo_end_to_end_small(tmp_path, monkeypatch):
    """The whole chain on a small override (6 train pairs, 4 steps): a tile-only export, parity, the test
    gain of the deblurred files and the comparison image that the last lines name."""
    import json

    from cli import score_test_split
    from nafnet_core.images import read_rgb8

    monkeypatch.setenv("NAFNET_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    res = CliRunner().invoke(main, ["demo", "--out", str(out), "-q", "--steps", "4", "--set", "synth_count=6",
                                    "--set", "val_every=4", "--set", "crop=48"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "export" / "manifest.json").read_text())
    assert {a["shape"]["kind"] for a in manifest["artifacts"].values()} == {"tile"}  # no dynamic graph
    assert {a["precision"] for a in manifest["artifacts"].values()} >= {"fp32", "fp16"}
    lines = res.output.strip().splitlines()
    assert lines[-2].startswith("test gain: ") and "mean of the 1 test images" in lines[-2]
    assert lines[-1].startswith(f"open this: {out / 'comparison.png'} (blurry | deblurred | sharp")
    data = next((tmp_path / "cache").iterdir())
    test = score_test_split(data, data / "test" / "blur", out / "deblurred")  # the printed gain is the files'
    assert lines[-2].startswith(f"test gain: {test.gain:+.2f} dB")
    assert (out / "parity.json").exists()
    assert read_rgb8(out / "comparison.png").shape[1] == 3 * 256 * 2 + 2 * 8  # three 192x256 panels, 2x
