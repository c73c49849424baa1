"""``compare``: the experiment table built from what real (tiny) runs leave on disk."""

from __future__ import annotations

import csv
import io
import json
import shutil
import warnings

import pytest
from click.testing import CliRunner

import nafnet_core as nc
from nafnet_core.errors import UserError
from train.compare import compare_table, summarize_runs
from train.config import build_config

SHORT = {"steps": 3, "crop": 64, "batch": 2, "val_every": 3, "save_every": 3, "log_every": 1, "val_max": 2,
         "workers": 0}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread per module


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory, synth_root):
    """Two real 3-step tiny runs that differ in the gate and the learning rate; the first is evaluated on the
    test split, exported into its run folder and benchmarked at 720x1280."""
    from export import export_model
    from runtime.bench import bench_export
    from train.evaluate import evaluate_checkpoint
    from train.loop import train

    root = tmp_path_factory.mktemp("runs")
    a = train(build_config("tiny", sets=SHORT), root / "simple", progress=False, device="cpu").run_dir
    b = train(build_config("tiny", sets={**SHORT, "lr": 2e-3, "model_args": {"gate": "swiglu"}}), root / "swiglu",
              progress=False, device="cpu").run_dir
    result, meta = evaluate_checkpoint(a / "best.pt", split="test", max_images=2, device="cpu", progress=False)
    result.write_json(a / "test.json", **meta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_model(a / "best.pt", a / "export", tiles=[(64, 64)], dynamic=False, fp16=False, check=False)
    bench = bench_export(a / "export", (720, 1280), repeats=1, warmup=0, threads=1, include_torch=False,
                         progress=False)
    (a / "export" / "bench.json").write_text(json.dumps(bench))
    return a, b, result.summary(), bench


def test_table_reads_every_source(trained_runs):
    a, b, test_summary, bench = trained_runs
    rows = summarize_runs([a, b])
    ra, rb = rows
    assert (ra.run, rb.run) == ("simple", "swiglu")
    # config differences: exactly the keys set differently (paths and bookkeeping are not listed); the
    # model_args as the architecture fields they changed
    assert ra.differs == {"lr": 4e-3, "model.gate": "simple"} and rb.differs == {"lr": 2e-3, "model.gate": "swiglu"}
    # model cost from the config, equal to counting the real models
    assert ra.parameters == nc.count_parameters(nc.create_model("tiny"))
    assert rb.parameters == nc.count_parameters(nc.create_model("tiny", gate="swiglu"))
    assert ra.gflop_256 == round(nc.model_gflops(nc.get_config("tiny"), 256, 256), 2)
    # metrics.csv: the best validation row and the median throughput
    with open(a / "metrics.csv", newline="") as f:
        val = [r for r in csv.DictReader(f) if r["kind"] == "val"]
    best = max(val, key=lambda r: float(r["val_psnr"]))
    assert ra.best_val_psnr == pytest.approx(float(best["val_psnr"]))
    assert ra.val_input_psnr == pytest.approx(float(best["val_input_psnr"]))
    assert ra.best_step == 3 and ra.train_images_per_s > 0
    # the eval JSON in the run folder
    assert ra.test_psnr == pytest.approx(test_summary["psnr"]) and rb.test_psnr is None
    # the export of this run's best.pt, matched by sha256, and its bench result at 720x1280
    assert ra.export == str(a / "export") and rb.export is None
    ort = [r["median_ms"] for r in bench["rows"] if r["backend"] == "onnxrt" and r["precision"] == "fp32"]
    assert ra.onnxrt_720p_ms == pytest.approx(min(ort))
    table = compare_table(rows)
    assert "lr=0.002" in table and "model.gate=swiglu" in table
    assert f"{ra.test_psnr:.2f} / {ra.test_ssim:.4f}" in table


def test_export_of_another_checkpoint_is_not_attributed(trained_runs, tmp_path):
    a, b, _, _ = trained_runs
    c = tmp_path / "copy"
    shutil.copytree(b, c)
    shutil.copytree(a / "export", c / "export")  # an export whose source is a's best.pt, not c's
    assert summarize_runs([c])[0].export is None


def test_an_old_run_with_only_config_and_metrics_compares(trained_runs, tmp_path):
    a, _, _, _ = trained_runs
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(a / "config.json", old)
    shutil.copy(a / "metrics.csv", old)
    row = summarize_runs([old])[0]
    assert row.best_val_psnr is not None and row.test_psnr is None and row.export is None
    assert "-" in compare_table([row])


def test_runs_from_before_new_keys_differ_only_where_they_did(trained_runs, tmp_path):
    # An old run: config.json without the training keys and model options added since (they default), and a
    # variant run (input FFT) made by changing only the preset
    a, _, _, _ = trained_runs
    config = json.loads((a / "config.json").read_text())
    old, variant = tmp_path / "old", tmp_path / "fft"
    for d, cfg in ((old, {k: v for k, v in config.items() if k not in ("ema", "compile", "tensorboard", "model_args")}),
                   (variant, {**config, "model": "tiny-fft"})):
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg))
    rows = summarize_runs([a, old, variant])
    assert [r.differs for r in rows] == [{"model.input_fft": "none"}, {"model.input_fft": "none"},
                                         {"model.input_fft": "fs"}]
    assert rows[2].parameters == nc.count_parameters(nc.create_model("tiny-fft"))
    assert rows[2].gflop_720p > rows[0].gflop_720p  # the input FFT's matrices are counted
    assert "model.input_fft=fs" in compare_table(rows)


def test_not_a_run_is_one_line(tmp_path):
    with pytest.raises(UserError, match="not a training run"):
        summarize_runs([tmp_path])
    with pytest.raises(UserError, match="not a directory"):
        summarize_runs([tmp_path / "missing"])


def test_cli_json_and_csv(trained_runs, tmp_path):
    from cli import main

    a, b, _, _ = trained_runs
    out = CliRunner().invoke(main, ["compare", str(a), str(b), "--json", str(tmp_path / "t.json"),
                                    "--csv", str(tmp_path / "t.csv")])
    assert out.exit_code == 0, out.output
    assert "simple" in out.output and "swiglu" in out.output
    rows = json.loads((tmp_path / "t.json").read_text())
    assert [r["run"] for r in rows] == ["simple", "swiglu"]
    table = list(csv.DictReader(io.StringIO((tmp_path / "t.csv").read_text())))
    assert (table[1]["differs"] == "lr=0.002 model.gate=swiglu"
            and float(table[0]["parameters"]) == rows[0]["parameters"])
    bad = CliRunner().invoke(main, ["compare", str(tmp_path)])
    assert bad.exit_code == 1 and "not a training run" in bad.output


def test_adarevd_runs_show_exit_depths_beside_a_nafnet_run(trained_runs, tmp_path):
    """An AdaRevD run (2 steps of stage 1) in the same table as a NAFNet run: each exit depth's PSNR, the adaptive
    PSNR and the exit histogram of the best validation (best_val.json, checked against what best.pt records) and
    of the test eval; the NAFNet row has none, and a table of NAFNet runs only has no such columns."""
    from cli import main
    from nafnet_core import read_checkpoint
    from train.compare import compare_csv, rows_as_dicts
    from train.evaluate import evaluate_checkpoint
    from train.loop import train

    a, b, _, _ = trained_runs
    revd = train(build_config("tiny-adarevd", sets={**SHORT, "steps": 2, "val_every": 2, "save_every": 2}),
                 tmp_path / "revd", progress=False, device="cpu").run_dir
    result, meta = evaluate_checkpoint(revd / "best.pt", split="test", max_images=2, device="cpu", progress=False)
    result.write_json(revd / "test.json", **meta)
    rows = summarize_runs([a, revd])
    ra, rr = rows
    val = read_checkpoint(revd / "best.pt")["extra"]["val"]  # what validation recorded with best.pt
    k = 3  # tiny-adarevd: 3 sub-decoders, exit depths 0..3
    assert rr.val_depth_psnr == pytest.approx([h["psnr"] for h in val["heads"][:k]])
    assert rr.val_adaptive_psnr == pytest.approx(val["heads"][k]["psnr"])
    hist = val["exit_histogram"]
    assert len(hist) == k + 1 and sum(hist) > 0
    assert rr.val_exit_shares == pytest.approx([100 * n / sum(hist) for n in hist], abs=0.01)
    assert rr.best_val_psnr == pytest.approx(val["psnr"], abs=1e-5) == pytest.approx(rr.val_depth_psnr[-1], abs=1e-5)
    test = result.summary()
    assert rr.test_depth_psnr == pytest.approx([h["psnr"] for h in test["heads"][:k]])
    assert rr.test_adaptive_psnr == pytest.approx(test["psnr"])  # eval reports the adaptive result
    assert rr.test_exit_shares == pytest.approx([100 * n / sum(test["exit_histogram"])
                                                 for n in test["exit_histogram"]], abs=0.01)
    assert all(getattr(ra, f) is None for f in ("val_depth_psnr", "val_adaptive_psnr", "val_exit_shares",
                                                 "test_depth_psnr", "test_adaptive_psnr", "test_exit_shares"))
    table = compare_table(rows).splitlines()
    assert "best val PSNR @depth 1..K" in table[0] and "test (TLC) exits % @0..K" in table[0]
    assert "/".join(f"{p:.2f}" for p in rr.val_depth_psnr) in table[3]
    assert "/".join(f"{s:.0f}" for s in rr.test_exit_shares) in table[3]
    assert f"{rr.test_adaptive_psnr:.2f}" in table[3]
    # JSON and CSV carry the same figures; a table of NAFNet runs only keeps its columns
    assert rows_as_dicts(rows)[1]["val_depth_psnr"] == rr.val_depth_psnr
    csv_rows = list(csv.DictReader(io.StringIO(compare_csv(rows))))
    assert csv_rows[0]["val_depth_psnr"] == "" and [float(v) for v in csv_rows[1]["test_exit_shares"].split("/")] \
        == pytest.approx(rr.test_exit_shares)
    plain = summarize_runs([a, b])
    assert "@depth" not in compare_table(plain) and "exit_shares" not in compare_csv(plain)
    assert not any("depth" in key for key in rows_as_dicts(plain)[0])
    out = CliRunner().invoke(main, ["compare", str(a), str(revd)])
    assert out.exit_code == 0 and "exits % @0..K" in out.output, out.output
