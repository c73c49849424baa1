"""demo: the full chain is run by hand (BENCHMARKS/README); here only what is cheap to check."""

from __future__ import annotations

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
