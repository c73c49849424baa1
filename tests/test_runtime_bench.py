"""bench: rows with latency, memory and GFLOP/s as a fraction of the machine's own matmul rate."""

from __future__ import annotations

import json
import shutil

from click.testing import CliRunner

from cli import main
from runtime.bench import BenchSpec, matmul_gflops, measure
from tests.helpers import TILE


def test_matmul_roof_is_measured():
    g = matmul_gflops(n=256, repeats=2)
    assert 0.1 < g < 1e5


def test_measure_counts_tiles_and_memory(tiny_tile_onnx):
    r = measure(BenchSpec("onnxrt", str(tiny_tile_onnx), "fp32", "auto", 100, 150, repeats=2, warmup=1))
    assert len(r["times"]) == 2 and all(t > 0 for t in r["times"])
    assert r["tile"] == [TILE, TILE] and r["tiles"] >= 6  # 112x160 padded, 64 tiles with overlap
    assert r["peak_rss_mb"] > 50


def test_bench_command(tiny_export, tmp_path):
    from runtime.models import BENCH_RECORD, machine_id, open_runner

    export = tmp_path / "export"  # a copy: the bench record it gains changes what --backend auto picks there
    shutil.copytree(tiny_export, export)
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(main, ["bench", str(export), "--size", "64x96", "--repeats", "1", "--warmup", "0",
                                    "--big", "96x160", "--json", str(out), "-q"])
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    assert json.loads((export / BENCH_RECORD).read_text()) == result and result["machine"] == machine_id()
    assert "by measurement" in open_runner(export).auto_note
    # the large image runs tiled on the fastest fp32 onnxruntime/OpenVINO row of the same run
    small = [r for r in result["rows"] if r["size"] == "64x96" and r["backend"] in ("onnxrt", "openvino")
             and r["precision"] == "fp32" and r["median_ms"]]
    big = [r for r in result["rows"] if r["size"] == "96x160"]
    assert len(big) == 1 and big[0]["backend"] == min(small, key=lambda r: r["median_ms"])["backend"]
    assert big[0]["median_ms"] > 0 and big[0]["peak_rss_mb"] > 0, big
    assert result["matmul_gflops"] > 0 and result["model_gflop"] > 0
    rows = {(r["backend"], r["precision"], r["mode"]): r for r in result["rows"]}
    torch_row = rows[("torch", "fp32", "whole")]
    assert torch_row["vs_torch"] == 1.0 and torch_row["peak_rss_mb"] > 0
    ort = rows[("onnxrt", "fp32", "whole")]
    assert ort["median_ms"] > 0 and 0 < ort["fraction_of_matmul_roof"] and ort["images_per_s"] > 0
    assert "GFLOP/s" in res.output and "matmul roof" in res.output
    assert "target" not in res.output  # figures only: the product sets no acceptance targets
