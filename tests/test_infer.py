"""`infer`: folder trees, formats kept, resume, failures listed, compare images, every backend one path."""

from __future__ import annotations

import numpy as np
import png
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cli import main
from nafnet_core.images import read_image, to_tensor, to_uint8
from runtime.infer import collect_inputs
from runtime.restore import AUTO_WHOLE_MAX_PIXELS, choose_tiling
from runtime.runners import TorchRunner
from tests.helpers import TILE, photo


def u8(h, w, index=0):
    return to_uint8(photo(h, w, index))


@pytest.fixture
def tree(tmp_path):
    src = tmp_path / "in"
    (src / "sub" / "deeper").mkdir(parents=True)
    Image.fromarray(u8(40, 56)).save(src / "a.png")
    Image.fromarray(u8(48, 32, 1)).save(src / "sub" / "b.jpg", quality=95)
    rgba = np.dstack([u8(36, 44, 2), np.linspace(0, 255, 36 * 44).reshape(36, 44).astype(np.uint8)])
    Image.fromarray(rgba, "RGBA").save(src / "sub" / "deeper" / "c.png")
    g16 = (photo(32, 48, 3)[0].permute(1, 2, 0).numpy() * 65535).round().astype(np.uint16)
    with open(src / "sub" / "d16.png", "wb") as f:
        png.Writer(48, 32, greyscale=False, bitdepth=16).write(f, g16.reshape(32, -1))
    Image.fromarray(u8(33, 47, 4)[:, :, 0], "L").save(src / "gray.tiff")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (src / "notes.txt").write_text("not an image, ignored")
    (src / ".hidden.png").write_bytes(b"ignored too")
    return src


def test_infer_folder_end_to_end(tree, tmp_path, tiny_checkpoint, tiny_tlc):
    out = tmp_path / "out"
    cli = CliRunner()
    res = cli.invoke(main, ["infer", str(tree), "--model", str(tiny_checkpoint), "--out", str(out), "-q", "--compare"])
    assert res.exit_code == 1, res.output  # broken.png failed, the others were written
    assert "broken.png" in res.output and "wrote 5" in res.output
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["a.png", "gray.tiff", "sub/b.jpg", "sub/d16.png", "sub/deeper/c.png"]
    assert not list(out.rglob("*.part"))
    assert len([p for p in (tmp_path / "out_compare").rglob("*") if p.is_file()]) == 5

    # values: the CLI output is exactly the model's output, clamped and rounded
    _, model = tiny_tlc
    with torch.inference_mode():
        expect = to_uint8(model(to_tensor(read_image(tree / "a.png"))))
    np.testing.assert_array_equal(read_image(out / "a.png").rgb, expect)
    # depth, alpha, grayness kept
    assert read_image(out / "sub" / "d16.png").dtype == np.uint16
    c_in, c_out = read_image(tree / "sub" / "deeper" / "c.png"), read_image(out / "sub" / "deeper" / "c.png")
    np.testing.assert_array_equal(c_out.alpha, c_in.alpha)
    assert Image.open(out / "gray.tiff").mode == "L"

    # a re-run resumes: everything present is skipped; --overwrite redoes it
    (out / "a.png").unlink()
    res = cli.invoke(main, ["infer", str(tree), "--model", str(tiny_checkpoint), "--out", str(out), "-q"])
    assert "wrote 1, skipped 4" in res.output
    res = cli.invoke(main, ["infer", str(tree / "a.png"), "--model", str(tiny_checkpoint), "--out", str(out), "-q",
                            "--overwrite"])
    assert res.exit_code == 0 and "wrote 1, skipped 0" in res.output


def test_infer_onnx_tile_graph_matches_torch(tree, tmp_path, tiny_tile_onnx, tiny_checkpoint):
    for name, model in [("ort", tiny_tile_onnx), ("torch", tiny_checkpoint)]:
        res = CliRunner().invoke(main, ["infer", str(tree / "a.png"), "-m", str(model), "--out", str(tmp_path / name),
                                        "--tile", str(TILE), "--overlap", "16", "-q"])
        assert res.exit_code == 0, res.output
    a, b = read_image(tmp_path / "ort" / "a.png").rgb, read_image(tmp_path / "torch" / "a.png").rgb
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_infer_errors_are_one_line(tmp_path, tiny_checkpoint, tiny_tile_onnx):
    (tmp_path / "empty").mkdir()
    cli = CliRunner()
    res = cli.invoke(main, ["infer", str(tmp_path / "empty"), "-m", str(tiny_checkpoint), "-q"])
    assert res.exit_code == 1 and "no images or videos found" in res.output
    res = cli.invoke(main, ["infer", str(tmp_path / "empty"), "-m", str(tiny_checkpoint), "--backend", "trt"])
    assert res.exit_code == 1 and "Error:" in res.output and "Traceback" not in res.output
    res = cli.invoke(main, ["infer", str(tmp_path), "-m", str(tiny_checkpoint), "--tile", "100"])
    assert res.exit_code == 2 and "multiples of 16" in res.output
    res = cli.invoke(main, ["infer", str(tmp_path), "-m", str(tiny_tile_onnx), "--tile", "128"])
    assert res.exit_code == 1 and f"{TILE}x{TILE} tiles only" in res.output


def test_output_folder_inside_input_is_not_reprocessed(tmp_path):
    (tmp_path / "deblurred").mkdir()
    Image.fromarray(u8(20, 20)).save(tmp_path / "a.png")
    Image.fromarray(u8(20, 20)).save(tmp_path / "deblurred" / "a.png")
    assert [r.as_posix() for _, r in collect_inputs(tmp_path, exclude=[tmp_path / "deblurred"])] == ["a.png"]


def test_auto_tiling_policy(tiny_tlc):
    dynamic = TorchRunner(tiny_tlc[1])
    assert choose_tiling(dynamic, 720, 1280) is None  # a 720p frame runs whole
    big = choose_tiling(dynamic, 2160, 3840)
    assert big is not None and 1088 * 1920 > AUTO_WHOLE_MAX_PIXELS  # 4K is tiled: memory bounded by the tile
    assert choose_tiling(dynamic, 2160, 3840, "none") is None
    dynamic.fixed_shape = (256, 256)
    assert choose_tiling(dynamic, 100, 100).tile == (256, 256)
