"""Checkpoints: round trips, official .pth files, safe loading, clear errors, atomic writes."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

import nafnet_core as nc
from nafnet_core.checkpoint import CheckpointError, infer_config
from tests.helpers import make_nontrivial, photo


@pytest.fixture
def model():
    torch.manual_seed(3)
    return make_nontrivial(nc.create_model("tiny"))


def _out(m, x):
    with torch.no_grad():
        return m.eval()(x)


def test_round_trip_same_outputs(tmp_path, model):
    path = nc.save_checkpoint(tmp_path / "m.pt", model, train_size=64, step=123, best_psnr=27.5)
    ckpt = nc.load_checkpoint(path)
    x = photo(37, 45)
    assert torch.equal(_out(ckpt.model, x), _out(model, x))
    assert ckpt.config == model.config and ckpt.preset == "tiny" and ckpt.train_size == 64
    assert ckpt.extra == {"step": 123, "best_psnr": 27.5} and ckpt.source == "project"
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temp files left


def test_round_trip_custom_config_and_safetensors(tmp_path):
    model = make_nontrivial(nc.create_model("tiny", width=4, gate="geglu"))
    ckpt = nc.load_checkpoint(nc.save_checkpoint(tmp_path / "m.safetensors", model, train_size=48, note="x"))
    x = photo(20, 30)
    assert torch.equal(_out(ckpt.model, x), _out(model, x))
    assert ckpt.config.gate == "geglu" and ckpt.preset is None and ckpt.train_size == 48 and ckpt.extra == {"note": "x"}


def test_official_pth_loads_by_preset(tmp_path, model):
    path = nc.save_official(tmp_path / "NAFNet-official.pth", model)
    raw = torch.load(path, weights_only=True)
    assert list(raw) == ["params"]
    ckpt = nc.load_checkpoint(path, preset="tiny")
    x = photo(33, 40)
    assert torch.equal(_out(ckpt.model, x), _out(model, x))
    assert ckpt.source == "official" and ckpt.preset == "tiny"


def test_official_pth_needs_preset_and_suggests_it(tmp_path, model):
    path = nc.save_official(tmp_path / "off.pth", model)
    with pytest.raises(CheckpointError, match=r"pass --preset .*'tiny'"):
        nc.load_checkpoint(path)


def test_official_pth_wrong_preset_lists_keys_and_suggests(tmp_path, model):
    path = nc.save_official(tmp_path / "off.pth", model)
    with pytest.raises(CheckpointError) as e:
        nc.load_checkpoint(path, preset="seed-v1")
    msg = str(e.value)
    assert str(path) in msg and "shape mismatch" in msg and "preset 'tiny'" in msg
    sd = dict(model.state_dict())
    sd.pop("ending.bias")
    sd["extra.weight"] = torch.zeros(1)
    torch.save({"params": sd}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"missing keys: ending\.bias.*unexpected keys: extra\.weight"):
        nc.load_checkpoint(tmp_path / "bad.pth", preset="tiny")


def test_infer_config_from_state_dict():
    cfg = nc.get_config("seed-v3")
    with torch.device("meta"):
        sd = nc.NAFNet(cfg).state_dict()
    assert infer_config(sd) == cfg


def test_project_checkpoint_with_conflicting_preset(tmp_path, model):
    path = nc.save_checkpoint(tmp_path / "m.pt", model)
    with pytest.raises(CheckpointError, match="different architecture"):
        nc.load_checkpoint(path, preset="seed-v1")


@pytest.mark.parametrize("case", ["empty", "truncated", "text", "directory", "missing", "list", "random_bytes"])
def test_bad_files_give_one_clear_error(tmp_path, model, case):
    path = tmp_path / "bad.pt"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "truncated":
        nc.save_checkpoint(path, model)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "text":
        path.write_text("this is not a checkpoint\n")
    elif case == "directory":
        path.mkdir()
    elif case == "list":
        torch.save([1, 2, 3], path)
    elif case == "random_bytes":
        path.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError) as e:
        nc.load_checkpoint(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_malicious_pickle_is_refused_not_executed(tmp_path):
    _Evil.marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        torch.save({"params": {"intro.weight": _Evil()}}, f, pickle_protocol=2)
    with pytest.raises(CheckpointError, match="refused"):
        nc.load_checkpoint(path, preset="tiny")
    assert not _Evil.marker.exists()
    # plain pickle (not a torch zip) is refused too
    path.write_bytes(pickle.dumps({"params": _Evil()}, protocol=2))
    with pytest.raises(CheckpointError):
        nc.load_checkpoint(path, preset="tiny")
    assert not _Evil.marker.exists()


def test_failed_save_keeps_previous_file(tmp_path, model, monkeypatch):
    path = nc.save_checkpoint(tmp_path / "m.pt", model, step=1)
    good = path.read_bytes()

    def broken_save(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        nc.save_checkpoint(path, model, step=2)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]
