"""`cli.py info` end to end through click."""

from __future__ import annotations

from click.testing import CliRunner

import nafnet_core as nc
from cli import main


def test_help_lists_working_commands():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0 and "info" in result.output


def test_info_preset():
    result = CliRunner().invoke(main, ["info", "nafnet-gopro-width32"])
    assert result.exit_code == 0, result.output
    assert "17,111,907" in result.output
    assert "L0: 384x384" in result.output and "L4: 24x24" in result.output
    assert "GFLOP 256x256   31.91" in result.output and "448.71" in result.output


def test_info_checkpoint_and_official(tmp_path):
    model = nc.create_model("tiny")
    nc.save_checkpoint(tmp_path / "m.pt", model, train_size=64)
    result = CliRunner().invoke(main, ["info", str(tmp_path / "m.pt")])
    assert result.exit_code == 0, result.output
    assert "290,715" in result.output and "L0: 96x96" in result.output
    nc.save_official(tmp_path / "o.pth", model)
    result = CliRunner().invoke(main, ["info", str(tmp_path / "o.pth"), "--preset", "tiny"])
    assert result.exit_code == 0 and "official" in result.output


def test_info_bad_file_is_one_line_error(tmp_path):
    bad = tmp_path / "broken.pt"
    bad.write_text("nope")
    result = CliRunner().invoke(main, ["info", str(bad)])
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and str(bad) in result.output
    assert "Traceback" not in result.output and result.output.count("\n") == 1
