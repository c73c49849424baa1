"""The measurement scripts of benchmarks/: each one's command line answers --help, and their cheap parts run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("variants", "serve", "video", "official_step", "export_cost", "tiling", "int8")


#: Runs each script as ``python -m`` does (runpy, ``__main__``) with ``--help``, all in one interpreter (one torch
#: import instead of six), printing one JSON line per script: its exit code and what it printed.
_HELP_ALL = """
import contextlib, io, json, runpy, sys
for name in sys.argv[1:]:
    sys.argv = ["-m", "--help"]
    out, code = io.StringIO(), None
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_module(f"benchmarks.{name}", run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = e.code
    print(json.dumps({"name": name, "code": code, "out": out.getvalue()}))
"""


@pytest.fixture(scope="module")
def helps() -> dict[str, dict]:
    proc = subprocess.run([sys.executable, "-c", _HELP_ALL, *SCRIPTS], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return {r["name"]: r for r in map(json.loads, proc.stdout.splitlines())}


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_answers_help_from_the_repository_root(helps, name):
    assert helps[name]["code"] == 0, helps[name]
    assert helps[name]["out"].startswith(f"usage: python -m benchmarks.{name}"), helps[name]["out"]


def test_official_step_names_a_checkout_without_basicsr(tmp_path):
    from benchmarks.official_step import load_official
    from nafnet_core.errors import UserError

    with pytest.raises(UserError, match="no basicsr/models/archs/NAFNet_arch.py; pass the root of a checkout"):
        load_official(tmp_path)


# --------------------------------------------------------------------------------------------- benchmarks.common

def test_interleaved_calls_every_callable_in_turns_after_the_warmup_rounds():
    from benchmarks.common import interleaved

    log = []
    calls = {name: (lambda name=name: log.append(name) or name.upper()) for name in ("a", "b", "c")}
    t = interleaved(calls, rounds=3, warmup=2)
    assert log == ["a", "b", "c"] * 5  # 2 untimed rounds, then 3 timed ones, A B C each time
    assert {k: len(v) for k, v in t.seconds.items()} == {"a": 3, "b": 3, "c": 3}
    assert t.last == {"a": "A", "b": "B", "c": "C"} and t.reference == "a"


def test_interleaved_medians_and_ratios_against_the_first_or_a_named_reference():
    from benchmarks.common import interleaved

    figures = {"ref": iter([3.0, 1.0, 2.0]), "x": iter([4.0, 8.0, 6.0])}
    t = interleaved({k: (lambda it=it: next(it)) for k, it in figures.items()}, rounds=3, warmup=0, self_timed=True)
    assert t.seconds == {"ref": [3.0, 1.0, 2.0], "x": [4.0, 8.0, 6.0]}
    assert t.medians() == {"ref": 2.0, "x": 6.0}
    assert t.ratios() == {"ref": 1.0, "x": 3.0} and t.ratios("x") == {"ref": 1 / 3, "x": 1.0}
    # the clock's readings around each timed call (a fake clock advancing 0.5 s per reading)
    ticks = iter(range(100))
    t = interleaved({"a": lambda: None, "b": lambda: None}, rounds=2, warmup=1, clock=lambda: next(ticks) * 0.5)
    assert t.seconds == {"a": [0.5, 0.5], "b": [0.5, 0.5]}
    with pytest.raises(ValueError, match="rounds: 0"):
        interleaved({"a": lambda: None}, rounds=0)


def test_make_nontrivial_sets_the_same_weights_for_the_same_seed():
    import torch

    import nafnet_core as nc
    from benchmarks.common import make_nontrivial

    def weights(seed):
        torch.manual_seed(0)  # the same initialisation underneath
        return make_nontrivial(nc.create_model("tiny", width=4, enc_blk_nums=(1,), dec_blk_nums=(1,)),
                               seed=seed).state_dict()

    fresh = nc.create_model("tiny", width=4, enc_blk_nums=(1,), dec_blk_nums=(1,)).state_dict()
    a, b, other = weights(0), weights(0), weights(1)
    betas = [k for k in a if k.endswith(("beta", "gamma"))]
    assert betas and all(not fresh[k].any() for k in betas)  # a fresh model skips every block
    assert all(a[k].abs().sum() > 0 for k in betas)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], other[k]) for k in betas)


def test_photo_is_the_products_sample_photo_and_reaches_a_fifth_photo():
    import torch

    from benchmarks.common import photo
    from export.samples import sample_photo

    p = [photo(24, 32, i) for i in range(5)]
    assert all(x.shape == (1, 3, 24, 32) and 0 <= x.min() and x.max() <= 1 for x in p)
    assert all(not torch.equal(p[i], p[j]) for i in range(5) for j in range(i))
    assert torch.equal(sample_photo(24, 32, index=3, batch=2), torch.cat([p[3], p[0]]))  # it cycles over four
    assert torch.equal(photo(24, 32, 5), p[0])


def test_machine_names_the_instruction_sets_of_the_cpu_flags(tmp_path):
    from benchmarks.common import machine, machine_line

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512_vnni avx512_bf16 amx_tile "
                    "amx_bf16 avx_vnni\n")
    m = machine(info)
    assert m["isa"] == ["amx_bf16", "amx_tile", "avx2", "avx512_bf16", "avx512_vnni", "avx512f", "avx_vnni"]
    assert m["cores"] >= 1 and m["cpu"]
    assert machine_line(m).startswith(f"CPU {m['cpu']}, {m['cores']} cores, amx_bf16 amx_tile avx2")
    assert machine(tmp_path / "missing")["isa"] == []
    assert "no AVX2/AVX-512/VNNI/BF16/AMX flags" in machine_line(machine(tmp_path / "missing"))


# --------------------------------------------------------------------------------------------- tiny runs

def test_tiling_sweep_rows_on_a_tiny_model():
    import torch

    import nafnet_core as nc
    from benchmarks.common import make_nontrivial, photo
    from benchmarks.tiling import TilingRow, tiling_sweep
    from runtime.bench import blurred

    torch.manual_seed(0)
    model = nc.convert_to_tlc(make_nontrivial(nc.create_model("tiny", width=4, enc_blk_nums=(1,),
                                                              dec_blk_nums=(1,))), 32)
    targets = [photo(48, 64, 1)]
    rows, whole_s = tiling_sweep(model, [blurred(t) for t in targets], targets, [(32, 0), (32, 16)], progress=False)
    assert whole_s > 0 and [(r.tile, r.overlap) for r in rows] == [(32, 0), (32, 16)]
    assert all(isinstance(r, TilingRow) and r.tiles >= 4 and r.seconds >= 0 and r.max_abs_diff >= 0 for r in rows)
    assert rows[1].tiles > rows[0].tiles  # an overlap needs more tiles


def test_variants_times_the_frequency_selection_both_ways():
    from benchmarks.variants import bench_fs

    r = bench_fs((32, 32), repeats=2)
    assert len(r["matrices_s"]) == len(r["torch_fft_s"]) == 2 and r["ratio"] > 0
    assert r["max_abs_diff"] < 1e-3 * max(1.0, r["max_abs_value"])


def test_export_cost_times_graphs_through_the_runner_of_bench(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from benchmarks.export_cost import ort_latencies

    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["output"])], "identity",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, 16, 16])])
    path = tmp_path / "identity.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what onnxruntime 1.20+ reads (onnx's newest may be newer than this onnxruntime's)
    onnx.save(model, path)
    lat = ort_latencies({"a": path, "b": path}, (1, 3, 16, 16), repeats=3, threads=1)
    assert set(lat) == {"a", "b"} and all(v > 0 for v in lat.values())


def test_serve_bench_reads_the_memory_of_a_process_group():
    import os

    from benchmarks.serve import _percentile, group_rss_mib

    rss = group_rss_mib(os.getpgid(0))  # this test's own group: pytest at least
    assert rss and sum(rss.values()) > 10, rss
    assert _percentile([5.0, 1.0, 3.0, 2.0, 4.0], 50) == 3.0 and _percentile([1.0, 2.0], 95) == 2.0
