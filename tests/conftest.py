"""Fixtures and hooks of the test suite (plain helpers and constants are in tests/helpers.py).

Session fixtures are built once per test process (once per pytest-xdist worker) and shared by every test module
that asks for them: the tiny TLC model, its checkpoint and exports, the embedded synthetic data set; the tiny
checkpoint and its exports are built once per run and shared by the workers too (``_once_per_run``). Tests only
read what a shared fixture holds; a test that changes an export or a data set, or runs a command that records
its result in the export (``parity``, ``bench``), copies it into its own ``tmp_path`` first.

Two lanes: the full suite (the README's test command) and the fast lane ``-m "not slow"``. A test is ``slow`` when
it is marked so itself (a real server, a subprocess killed at a random moment, DDP, a long training run, the demo
end to end) or when it uses a fixture of ``SLOW_FIXTURES`` (below).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

pytest.register_assert_rewrite("tests.helpers")

from tests.helpers import MINI, TILE, TRAIN_SIZE, make_nontrivial  # noqa: E402

#: Fixtures whose build takes ten seconds to minutes; every test that uses one (directly or through another
#: fixture) is marked ``slow``. Exports with a dynamic graph: the dynamo exporter's symbolic-shape tracing takes
#: tens of seconds per dynamic graph even for these tiny models (fixed-tile exports take a few seconds and stay in
#: the fast lane: ``tiny_tile_export``, test_export.py's ``fp16_export`` and ``plain_tile_export``), and the larger
#: fixed-tile exports of the 9-block ``tiny`` preset. Training runs of more than a few seconds.
SLOW_FIXTURES = frozenset({
    # dynamic-shape exports
    "tiny_export",  # conftest: the tiny TLC model, fp32 + FP16, dynamic and 64x64
    "tiny_onnx",  # conftest: the fp32 graphs of tiny_export
    "tlc_export",  # test_export.py: fp32, TLC, folded, dynamic + 48x64
    "plain_dynamic_export",  # test_export.py: fp32, no TLC, not folded, dynamic
    "fnaf_export",  # test_fnafnet.py: tiny-fnaf, 48x64 fp32 + FP16 and the dynamic fp32 graph
    "fs_export",  # test_input_fft.py: tiny-fft, 64x64 fp32 + FP16 and the dynamic fp32 graph
    # fixed-tile exports of the 9-block tiny preset through the command line (10-15 s)
    "hot_export",  # test_export_fp16_stream.py: the checkpoint whose residual stream overflows FP16
    # training runs
    "tiny_run",  # test_train.py: 300 steps of the tiny preset
    "fp32_short_run",  # test_train.py: the fp32 reference run of the speed options
    "trained_runs",  # test_compare.py: two short runs, evaluated, exported and benchmarked
})


def _share_the_cores_between_workers() -> None:
    """Under pytest-xdist (the README's test command runs ``-n auto``), each worker gets its share of the cores:
    torch intra-op threads and OMP/MKL threads of the subprocesses it starts (CLI, DDP ranks). Two workers of two
    OpenMP threads each on two cores wait on each other's threads (see ``one_thread``)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers > 1:
        share = str(max(1, (os.cpu_count() or 1) // workers))
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[name] = share
        torch.set_num_threads(int(share))


_share_the_cores_between_workers()


#: Files whose own exports or training runs take one to three minutes on 2 cores (``--durations``: the dynamic
#: exports of the variants, the training and kill tests, the tuner's studies). Under ``--dist loadfile`` the
#: workers take whole files in collection order, so these go first and every worker ends on short files (longest
#: first: the workers finish together instead of one running a three-minute file while the other idles).
LONGEST_FILES = ("test_tune.py", "test_cgnet.py", "test_fnafnet.py", "test_input_fft.py", "test_export.py",
                 "test_train.py", "test_reliability_train.py", "test_serve.py")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Marks ``slow`` every test that uses a fixture of ``SLOW_FIXTURES`` (before ``-m`` selects), and puts the
    files of ``LONGEST_FILES`` first (each file's tests keep their order)."""
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept otherwise


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for the test modules that use it (``pytestmark =
    pytest.mark.usefixtures("one_thread")``): their tiny models gain nothing from two, and on a machine whose cores are
    busy with other work two OpenMP threads waiting on each other made a 32-px step 200x slower
    (9.2 s vs 0.044 s measured here)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def tiny_model():
    from nafnet_core import create_model

    torch.manual_seed(0)
    return make_nontrivial(create_model("tiny"))


# --- the tiny TLC model of the runtime tests, its checkpoint and exports ---------------------------------------


@pytest.fixture(scope="session")
def tiny_tlc():
    """(plain model, TLC model): ``tiny`` with MINI blocks, random beta/gamma and strong SCA."""
    import nafnet_core as nc

    torch.manual_seed(0)
    model = make_nontrivial(nc.create_model("tiny", **MINI))
    return model, nc.convert_to_tlc(model, TRAIN_SIZE)


def _once_per_run(tmp_path_factory, name: str, build: Callable[[Path], object]) -> Path:
    """A directory filled by ``build(directory)`` once per test run. Under pytest-xdist the workers share it: the
    first worker to ask builds it while the others wait on a lock, and later ones find it built (without xdist it
    is built in this test process's temporary directory). Tests only read it, as every shared fixture."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        path = tmp_path_factory.mktemp(name)
        build(path)
        return path
    root = tmp_path_factory.getbasetemp().parent  # the run's temporary directory, above every worker's own
    path, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when a crashed worker exits
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)  # what a worker that failed mid-build left
            path.mkdir()
            build(path)
            done.touch()
    return path


def _listing(directory: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(directory).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _read_only(directory: Path):
    """Yields ``directory`` and, at the end of the session, fails naming what a test added, removed or changed in
    it (a shared fixture is read by every test that asks for it: one that changes it works on a copy)."""
    before = _listing(directory)
    yield directory
    after = _listing(directory)
    changed = sorted(set(before) ^ set(after) | {k for k in before.keys() & after.keys() if before[k] != after[k]})
    assert not changed, f"a test changed the shared {directory} (copy it first): {', '.join(changed)}"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_tlc):
    import nafnet_core as nc

    directory = _once_per_run(tmp_path_factory, "tiny_ckpt",
                              lambda d: nc.save_checkpoint(d / "tiny.pt", tiny_tlc[0], train_size=TRAIN_SIZE))
    return directory / "tiny.pt"


def _export(tmp_path_factory, name, checkpoint, **kwargs) -> Path:
    from export import export_model

    def build(out):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_model(checkpoint, out, check=False, **kwargs)

    return _once_per_run(tmp_path_factory, name, build)


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory, tiny_checkpoint):
    """An export directory (export package) of the TLC model: ONNX fp32 + FP16, dynamic and TILE x TILE (slow: two
    dynamic graphs; built once per run, shared by the xdist workers)."""
    yield from _read_only(_export(tmp_path_factory, "tiny_export", tiny_checkpoint, tiles=[(TILE, TILE)],
                                  dynamic=True, fp16=True))


@pytest.fixture(scope="session")
def tiny_onnx(tiny_export):
    """{"dynamic": path, "tile": path}: the fp32 ONNX graphs of the export."""
    from export import load_manifest

    m = load_manifest(tiny_export)
    return {"dynamic": m.path("onnx-fp32-dynamic"), "tile": m.path(f"onnx-fp32-{TILE}x{TILE}")}


@pytest.fixture(scope="session")
def tiny_tile_export(tmp_path_factory, tiny_checkpoint):
    """The same model exported for the TILE x TILE tile only (fp32 + FP16, no dynamic graph: a few seconds), for
    the tests whose assertions hold for a fixed-tile graph."""
    yield from _read_only(_export(tmp_path_factory, "tiny_tile_export", tiny_checkpoint, tiles=[(TILE, TILE)],
                                  dynamic=False, fp16=True))


@pytest.fixture(scope="session")
def tiny_tile_onnx(tiny_tile_export):
    """The fp32 TILE x TILE ONNX graph of ``tiny_tile_export``."""
    from export import load_manifest

    return load_manifest(tiny_tile_export).path(f"onnx-fp32-{TILE}x{TILE}")


# --- the synthetic data set ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def synth_root():
    """The embedded synthetic data set (nafnet_core.synth; generated once into the user's cache)."""
    from nafnet_core.synth import ensure_synthetic

    yield from _read_only(ensure_synthetic(progress=False))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory, synth_root):
    """A temporary cache (``NAFNET_CACHE_DIR``) holding the default synthetic set, for the tests whose runs find
    their data by default: a copy of ``synth_root`` (the same files; generating the set again takes a minute)."""
    path = tmp_path_factory.mktemp("cache")
    shutil.copytree(synth_root, path / synth_root.name)
    old = os.environ.get("NAFNET_CACHE_DIR")
    os.environ["NAFNET_CACHE_DIR"] = str(path)
    from nafnet_core.synth import ensure_synthetic

    assert ensure_synthetic(progress=False) == path / synth_root.name  # found, not generated again
    yield path
    if old is None:
        os.environ.pop("NAFNET_CACHE_DIR", None)
    else:
        os.environ["NAFNET_CACHE_DIR"] = old
