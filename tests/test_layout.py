"""The codebase's own rules: import layers, lint, no development-process words, what the wheel holds, the
console script."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Words of the development process, not of the product. (A pytest or onnxruntime "session" is fine; a
#: numbered one, or one that did the work, is not.) Spaces are written ``\s`` so that this file's own text holds
#: none of the phrases and the tree scan below covers it too.
PROCESS_WORDS = re.compile(
    r"\bsessions?\s?-?[0-9]+\b|\b(this|previous|earlier|next|last)\ssession\b|\bissues?\s?#?[0-9]+\b"
    r"|\bthe\slead\b|\bhelper\ssessions?\b|\bthe\sissue\sasks\b|\bwork\sitems?\b",
    re.IGNORECASE)
#: Phrases the scan must find, as word tuples (joined with spaces by the test) for the same reason.
PROCESS_EXAMPLES = [("fixed", "in", "session", "7"), ("see", "issue", "#6"), ("as", "the", "lead", "measured"),
                    ("(issue", "12)"), ("the", "issue", "asks", "for", "10", "s"), ("this", "session's", "figures"),
                    ("a", "helper", "session", "ran", "it")]


def process_words(text: str) -> list[str]:
    """The lines of ``text`` that speak of the development process."""
    return [line.strip() for line in text.splitlines() if PROCESS_WORDS.search(line)]


@pytest.mark.parametrize("words", PROCESS_EXAMPLES)
def test_process_words_are_found(words: tuple[str, ...]):
    text = " ".join(words)
    assert process_words(text) == [text]


@pytest.mark.parametrize("text", ["an onnxruntime InferenceSession per graph", "a pytest session fixture",
                                  "tests/helpers.py", "the session-scoped export", "issues a warning"])
def test_product_words_are_not_process_words(text: str):
    assert process_words(text) == []


def _tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    files = []
    for name in out.splitlines():
        path = ROOT / name
        if path.suffix in {".png", ".jpg", ".onnx", ".pt", ".bin"} or not path.is_file():
            continue
        files.append(path)
    return files


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_no_development_process_words_in_the_tree():
    hits = []
    for path in _tracked_text_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        hits += [f"{path.relative_to(ROOT)}: {line[:120]}" for line in process_words(text)]
    assert not hits, "process words in the tree:\n" + "\n".join(hits)


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip(f"{name} is not installed (it comes with the test extra: pip install -e '.[test]')")
    return found


def test_import_contracts_hold():
    """import-linter: the layers run one way, runtime/export/core never import train, no sibling cycles."""
    proc = subprocess.run([_tool("lint-imports")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_ruff_passes():
    proc = subprocess.run([_tool("ruff"), "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_product_imports_nothing_from_tests_or_benchmarks():
    pattern = re.compile(r"^\s*(from|import)\s+(tests|benchmarks)\b", re.MULTILINE)
    hits = []
    for package in ("nafnet_core", "train", "export", "runtime"):
        for path in (ROOT / package).rglob("*.py"):
            hits += [f"{path.relative_to(ROOT)}: {m.group(0).strip()}" for m in pattern.finditer(path.read_text())]
    hits += [f"cli.py: {m.group(0).strip()}" for m in pattern.finditer((ROOT / "cli.py").read_text())]
    assert not hits, hits


def test_console_script_runs_the_same_command_line():
    exe = shutil.which("nafnet") or shutil.which("nafnet", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("the nafnet console script is not installed (pip install -e . puts it on PATH)")
    via_script = subprocess.run([exe, "--help"], capture_output=True, text=True, cwd=ROOT)
    via_cli = subprocess.run([sys.executable, "cli.py", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert via_script.returncode == 0 == via_cli.returncode
    commands = lambda text: re.findall(r"^  ([a-z]+)\s", text, re.MULTILINE)  # noqa: E731
    assert commands(via_script.stdout) == commands(via_cli.stdout) and "demo" in commands(via_cli.stdout)


@pytest.mark.slow
def test_wheel_holds_the_packages_and_no_benchmark(tmp_path):
    """A built wheel: the four packages and cli.py, the console script, and nothing of tests/ or benchmarks/."""
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                           str(tmp_path), str(ROOT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"nafnet_core", "train", "export", "runtime", "cli.py"}, tops
    lab = {"runtime/bench_variants.py", "runtime/serve_bench.py", "runtime/video_bench.py", "train/bench_official.py",
           "export/bench.py"}  # the measurement scripts, now in benchmarks/
    assert not lab & set(names) and not [n for n in names if n.startswith(("benchmarks/", "tests/"))]
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "nafnet = cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
