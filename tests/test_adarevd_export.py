"""AdaRevD export (graph E + one graph per sub-decoder step) and the adaptive-exit runtime: parity against the
PyTorch model and against "run every depth, select per tile", fixed exits, lint, the export and infer CLIs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import nafnet_core as nc
from export.adarevd import export_adarevd
from nafnet_core.errors import UserError
from nafnet_core.tlc import convert_to_tlc
from runtime.adarevd import AdaRevDRuntime, parse_exit
from tests.test_adarevd import ForcedClasses, image, randomise

SIZE = (90, 150)  # padded 96 x 160: 2 x 3 tiles of 64
CLASSES = [0, 2, 3, 4, 1, 2]  # depths 3, 2, 1, 0, 3, 2: every exit of tiny-adarevd's table


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = randomise(nc.create_model("tiny-adarevd"), 21)
    model.ape[2] = ForcedClasses(CLASSES, 5)
    model = convert_to_tlc(model, train_size=64)
    out = tmp_path_factory.mktemp("adarevd-export")
    manifest = export_adarevd(model, out, SIZE, train_size=64)
    return model, out, manifest


@pytest.mark.slow
def test_runtime_matches_pytorch_and_run_all_select(exported):
    model, out, manifest = exported
    runtime = AdaRevDRuntime(out)
    x = image(*SIZE, seed=5)
    result = runtime.run(x.numpy())
    assert result.depths == [3, 2, 1, 0, 3, 2] and result.histogram == [1, 1, 2, 2]
    with torch.no_grad():
        want, depths = model(x, return_depths=True)
    assert depths.tolist() == result.depths
    np.testing.assert_allclose(result.image, want.numpy(), atol=1e-5, rtol=0)
    select = runtime.run_all_select(x.numpy())
    np.testing.assert_allclose(result.image, select.image, atol=1e-6, rtol=0)
    for k in range(model.depth + 1):
        fixed = runtime.run(x.numpy(), f"fixed:{k}")
        assert fixed.histogram == [6 if d == k else 0 for d in range(model.depth + 1)]
        with torch.no_grad():
            np.testing.assert_allclose(fixed.image, model(x, depth=k).numpy(), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_manifest_lint_and_refusals(exported):
    from export.lint import lint_path

    _, out, manifest = exported
    assert manifest["exits"] == [3, 3, 2, 1, 0] and manifest["depth"] == 3
    assert manifest["tiles"] == {"tile": 64, "overlap": 16, "rows": [0, 32], "cols": [0, 48, 96], "k": [64, 64],
                                 "blend": "normalized"}
    assert sorted(manifest["files"]) == ["adarevd-encoder.onnx", "adarevd-step1.onnx", "adarevd-step2.onnx",
                                         "adarevd-step3.onnx"]
    assert json.loads((out / "manifest.json").read_text()) == manifest
    findings = lint_path(out)
    assert findings and all(f.ok for f in findings), [f for f in findings if not f.ok]
    assert any(f.check == "no DFT op, no complex tensor" for f in findings)
    runtime = AdaRevDRuntime(out)
    with pytest.raises(UserError, match="exported for 90x150 images, got 64x64"):
        runtime.run(np.zeros((1, 3, 64, 64), np.float32))
    with pytest.raises(UserError, match="no fp16 graphs"):
        AdaRevDRuntime(out, "fp16")


def test_parse_exit():
    assert parse_exit("auto", 4) is None and parse_exit("fixed:0", 4) == 0 and parse_exit("fixed:4", 4) == 4
    for bad in ("fixed:5", "fixed:", "deep", "fixed:-1"):
        with pytest.raises(UserError, match="use auto or fixed:K with K in 0..4"):
            parse_exit(bad, 4)


@pytest.mark.slow
def test_export_and_infer_cli(tmp_path):
    from click.testing import CliRunner

    from cli import main
    from nafnet_core.checkpoint import save_checkpoint
    from nafnet_core.images import read_rgb8, write_rgb8

    save_checkpoint(tmp_path / "a.pt", randomise(nc.create_model("tiny-adarevd"), 22), train_size=64)
    r = CliRunner().invoke(main, ["export", str(tmp_path / "a.pt"), "--tile", "48x80", "--out", str(tmp_path / "e")])
    assert r.exit_code == 0, r.output
    assert "exit table [3, 3, 2, 1, 0]" in r.output and (tmp_path / "e" / "manifest.json").exists()
    photos = tmp_path / "in"
    photos.mkdir()
    for i in range(2):
        write_rgb8(photos / f"p{i}.png", (image(48, 80, seed=i)[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    r = CliRunner().invoke(main, ["infer", str(photos), "-m", str(tmp_path / "e"), "--out", str(tmp_path / "o"),
                                  "--exit", "fixed:2"])
    assert r.exit_code == 0, r.output
    assert "exits over all tiles depth 0: 0 (0%), depth 1: 0 (0%), depth 2: 4 (100%)" in r.output
    assert read_rgb8(tmp_path / "o" / "p0.png").shape == (48, 80, 3)


@pytest.mark.slow
def test_tiny_adarevd_trains_both_stages_exports_fp16_passes_parity_and_infers(tmp_path):
    """The whole path on the synthetic set: stage 1, stage 2, export (fp32 + FP16) at the set's image size, lint,
    `parity` (adaptive, every fixed exit, every depth select; both precisions), `infer` with the histogram."""
    from click.testing import CliRunner

    from cli import main
    from export.lint import lint_path
    from nafnet_core.images import read_rgb8
    from nafnet_core.synth import ensure_synthetic
    from tests.helpers import short_cfg
    from train.loop import train

    base = dict(model="tiny-adarevd", dropout=0.0, steps=6, crop=64, batch=2, val_every=6)
    train(short_cfg(loss="l1freq", **base), tmp_path / "s1", progress=False)
    train(short_cfg(stage=2, lr=1e-2, init=str(tmp_path / "s1" / "last.pt"), **base), tmp_path / "s2",
          progress=False)
    out = tmp_path / "e"
    r = CliRunner().invoke(main, ["export", str(tmp_path / "s2" / "best.pt"), "--tile", "192x256", "--fp16",
                                  "--out", str(out)])
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precisions"] == ["fp32", "fp16"] and len(manifest["files"]) == 8
    findings = lint_path(out)
    assert all(f.ok for f in findings), [f for f in findings if not f.ok]
    placement = [f for f in findings if f.check == "FP16 placement"]
    assert len(placement) == 4 and all("16 FP32 convs (subdenets." in f.detail for f in placement[1:])
    r = CliRunner().invoke(main, ["parity", str(out), "-q", "--json", str(tmp_path / "p.json")])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "p.json").read_text())
    rows = {(row["backend"], row["precision"], row["mode"]): row for row in report["rows"]}
    assert report["pass"] and report["images"] == 4
    for precision in ("fp32", "fp16"):
        for mode in ("adaptive", "every depth, select", "fixed:0", "fixed:1", "fixed:2", "fixed:3"):
            assert rows[("onnxruntime", precision, mode)]["pass"] is True, rows[("onnxruntime", precision, mode)]
    assert "exits = PyTorch's (80 tiles)" in rows[("onnxruntime", "fp32", "adaptive")]["status"]
    photos = ensure_synthetic(progress=False) / "test" / "blur"
    r = CliRunner().invoke(main, ["infer", str(photos), "-m", str(out), "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert "exits over all tiles depth 0:" in r.output
    written = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert written == sorted(p.name for p in photos.iterdir())
    assert read_rgb8(tmp_path / "o" / written[0]).shape == (192, 256, 3)


@pytest.mark.slow
def test_parity_refuses_an_export_without_its_checkpoint(exported, tmp_path):
    from runtime.adarevd import check_adarevd_parity

    _, out, _ = exported
    with pytest.raises(UserError, match="the PyTorch reference needs the source checkpoint"):
        check_adarevd_parity(out, tmp_path, progress=False)


@pytest.mark.slow
def test_bench_runs_each_step_on_the_tiles_deeper_than_it(exported):
    from runtime.adarevd import adarevd_bench_table, bench_adarevd

    _, out, _ = exported
    result = bench_adarevd(out, rounds=1, warmup=0, threads=1, progress=False)
    rows = {r["mode"]: r for r in result["rows"]}
    assert list(rows) == ["adaptive", "fixed:0", "fixed:1", "fixed:2", "fixed:3"] and result["tiles"] == 6
    # forced depths 3, 2, 1, 0, 3, 2: step 1 on the 5 tiles deeper than 0, step 2 on 4, step 3 on 2
    assert [(s["depth"], s["tiles"]) for s in rows["adaptive"]["steps"]] == [(1, 5), (2, 4), (3, 2)]
    assert rows["adaptive"]["histogram"] == [1, 1, 2, 2] and rows["adaptive"]["exit_shares"][0] == round(1 / 6, 4)
    assert rows["fixed:0"]["steps"] == [] and [s["tiles"] for s in rows["fixed:3"]["steps"]] == [6, 6, 6]
    assert all(r["median_ms"] > 0 and r["encoder_ms"] > 0 for r in result["rows"])
    table = adarevd_bench_table(result)
    assert "0: 17%, 1: 17%, 2: 33%, 3: 33%" in table and "6 tiles of 64x64" in table


def test_engines_of_the_step_graphs_take_one_to_all_tiles(monkeypatch, tmp_path):
    """What ``export --trt`` asks of TensorRT for an AdaRevD export (a recording stand-in: no GPU here): one
    engine per FP16 graph, the encoder's for the padded image, each step's five inputs batched 1..tiles."""
    import sys

    from export.adarevd import STATE_NAMES, _build_engines
    from export.trt_plan import TrtOptions
    from tests.test_tensorrt_build_contract import fake_tensorrt

    calls: list = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(calls))
    files = {"adarevd-encoder-fp16.onnx": {"role": "encoder", "precision": "fp16"},
             "adarevd-step1-fp16.onnx": {"role": "step", "depth": 1, "precision": "fp16"},
             "adarevd-step1.onnx": {"role": "step", "depth": 1, "precision": "fp32"}}
    tile_shapes = [(64, 4, 4), (32, 8, 8), (16, 16, 16), (8, 32, 32), (4, 64, 64)]
    engines = _build_engines(tmp_path, files, (1, 3, 96, 160), tile_shapes, 6,
                             TrtOptions(timing_cache=tmp_path / "cache.bin"), False)
    assert sorted(engines) == ["adarevd-encoder.engine", "adarevd-step1.engine"]
    assert engines["adarevd-step1.engine"]["built_from"] == "adarevd-step1-fp16.onnx"
    assert (tmp_path / "adarevd-step1.engine").read_bytes() == b"PLAN"
    profiles = [c[1] for c in calls if c[0] == "profile"]
    assert ("input", (1, 3, 96, 160), (1, 3, 96, 160), (1, 3, 96, 160)) in profiles
    for name, s in zip(STATE_NAMES, tile_shapes):
        assert (name, (1, *s), (6, *s), (6, *s)) in profiles
    assert engines["adarevd-step1.engine"]["tensorrt"]["profile"]["e0"]["max"] == [6, 4, 64, 64]
    assert not [c for c in calls if c[0] == "set_flag"]  # strongly typed: no precision flags
