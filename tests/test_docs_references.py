"""No tracked file cites a document that a clone of this repository does not contain.

Checked in every text file ``git ls-files`` lists (binary files skipped):

- paths ending in ``.md`` and ``docs/...`` paths must exist, relative to the repository root or to the
  citing file's folder (URLs are ignored: citing a public page is fine), and no absolute ``.md`` path;
  names the code itself writes (a Python string literal that is a whole ``.md`` file name) are files of an
  output folder, not citations; a path of another project listed in :data:`EXTERNAL_DOCS` is accepted on a
  line that names that project;
- markdown links ``[text](target)`` in ``.md`` files must point at an existing file;
- no mention of a ``shared`` folder beside the repository (the ``..`` + ``/shared`` form);
- design references (``docs/DESIGN.md §N``) must name that file and an existing section number; a
  title in parentheses after the number (``§4 (TLC)``) must be that section's title; inside
  ``docs/DESIGN.md`` every bare ``§N`` must exist;
- a quoted section title right after a ``.md`` path (``BENCHMARKS.md "Export"``) must begin a heading of
  that file.

The checker is a pure function of (path, text, repository root), unit-tested below on synthetic text so
that it is known to fail.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DESIGN = "docs/DESIGN.md"
SECTION = "\u00a7"  # the section sign

#: Paths inside other public repositories that the code cites by name: path -> the repository's name, which
#: must appear on the same line (so the path cannot be mistaken for one of this repository).
EXTERNAL_DOCS = {"docs/operators.md": "onnx-tensorrt"}

_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s)\]>\"'`]+")
_MD_LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)[^)\n]*\)")
_MD_PATH = re.compile(r"(?<![\w/.-])([\w.-]+(?:/[\w.-]+)*\.md)(?![\w-])")
_ABS_MD_PATH = re.compile(r"(?<![\w.-])(/[\w.-]+(?:/[\w.-]+)*\.md)(?![\w-])")
_DOCS_PATH = re.compile(r"(?<![\w/.-])(docs/[\w./-]*[\w-])")
_SHARED = re.compile(r"\.\./shared\b")
_ONE_REF = SECTION + r"\s*(\d+)(?:\s*\(([^()\n]*)\))?"
_DESIGN_REF = re.compile(r"([\w./-]*?)\bDESIGN(\.md)?\s*(" + _ONE_REF + r"(?:\s*(?:,|and|&)\s*" + _ONE_REF + r")*)")
_REF_ITEM = re.compile(_ONE_REF)
_QUOTED_TITLE = re.compile(r"([\w./-]*\.md)[,:]?\s+(?:sections?\s+)?[\"\u201c]([^\"\u201d\n]{1,100})[\"\u201d]")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)
_NUMBERED = re.compile(r"^(\d+)\.\s+(.*)$")


def _norm_title(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("`", "").replace("*", "")).strip().lower()


def headings(path: Path) -> list[str]:
    """Headings of a markdown file, normalised, with a leading ``N.`` removed."""
    out = []
    for h in _HEADING.findall(path.read_text(encoding="utf-8")):
        m = _NUMBERED.match(h.strip())
        out.append(_norm_title(m.group(2) if m else h))
    return out


def design_sections(root: Path) -> dict[int, str]:
    """``{N: normalised title}`` of the ``## N. Title`` headings of docs/DESIGN.md (empty if it is missing)."""
    path = root / DESIGN
    if not path.is_file():
        return {}
    sections = {}
    for h in _HEADING.findall(path.read_text(encoding="utf-8")):
        m = _NUMBERED.match(h.strip())
        if m:
            sections[int(m.group(1))] = _norm_title(m.group(2))
    return sections


def _resolves(root: Path, citing: str, target: str, from_root: bool = True) -> Path | None:
    """The existing file or folder ``target`` names, relative to the root (unless not ``from_root``) or the
    citing file's folder, inside the repository; None otherwise."""
    target = target.split("#", 1)[0].rstrip(".,;:")
    if not target:
        return None
    for base in ((root,) if from_root else ()) + ((root / citing).parent,):
        cand = (base / target).resolve()
        if cand.is_relative_to(root.resolve()) and cand.exists():
            return cand
    return None


def output_names(sources: dict[str, str]) -> set[str]:
    """``.md`` file names that Python ``sources`` (path -> text) hold as whole string literals: files the
    code writes or reads in output folders (e.g. an export's command sheet), which prose may name."""
    names = set()
    for path, text in sources.items():
        try:
            tree = ast.parse(text, filename=path)
        except SyntaxError:
            continue
        names |= {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
                  and re.fullmatch(r"[\w.-]+\.md", n.value)}
    return names


def find_problems(citing: str, text: str, root: Path, outputs: set[str] = frozenset()) -> list[str]:
    """One ``file:line: what`` entry per citation in ``text`` (file ``citing``, relative to ``root``) of a
    document that is not in the repository; ``outputs`` are file names the code writes (see
    :func:`output_names`), accepted outside ``docs/`` and ``..``."""
    problems: list[str] = []
    sections = design_sections(root)
    design = (root / DESIGN).resolve()
    is_markdown = citing.endswith(".md")
    for lineno, raw in enumerate(text.splitlines(), 1):
        where = f"{citing}:{lineno}"
        line = _URL.sub(" ", raw)
        if _SHARED.search(line):
            problems.append(f"{where}: cites a file outside the repository ({_SHARED.search(line).group(0)})")
        for m in _ABS_MD_PATH.finditer(line):
            problems.append(f"{where}: cites {m.group(1)}, an absolute path outside the repository")
        for m in _MD_PATH.finditer(line):
            token = m.group(1)
            if Path(token).name in outputs and not token.startswith(("docs/", "../")) or _external(token, line):
                continue
            if _resolves(root, citing, token) is None:
                problems.append(f"{where}: cites {m.group(1)}, which is not in the repository")
        for m in _DOCS_PATH.finditer(line):
            if _resolves(root, citing, m.group(1)) is None and not m.group(1).endswith(".md") \
                    and not _external(m.group(1), line):  # .md paths: above
                problems.append(f"{where}: cites {m.group(1)}, which is not in the repository")
        if is_markdown:
            for m in _MD_LINK.finditer(raw):
                target = m.group(1)
                if _URL.match(target) or target.startswith(("#", "mailto:")):
                    continue
                if _resolves(root, citing, target, from_root=False) is None:  # as a markdown viewer resolves it
                    problems.append(f"{where}: links to {target}, which is not in the repository")
        for m in _DESIGN_REF.finditer(line):
            named = f"{m.group(1)}DESIGN{m.group(2) or ''}"
            if m.group(2) is None or _resolves(root, citing, named) != design:
                problems.append(f"{where}: '{named} {SECTION}...' is not a file of this repository; "
                                f"cite {DESIGN} {SECTION}N (Title)")
                continue
            problems += _check_sections(where, m.group(3), sections)
        for m in _QUOTED_TITLE.finditer(line):
            path = _resolves(root, citing, m.group(1))
            if path is None or not path.is_file():
                continue  # a missing file is reported above
            title = _norm_title(m.group(2))
            if not any(h.startswith(title) for h in headings(path)):
                problems.append(f"{where}: {m.group(1)} has no section titled \"{m.group(2)}\"")
        if (root / citing).resolve() == design:
            problems += _check_sections(where, line, sections)
    return sorted(set(problems), key=problems.index)


def _external(token: str, line: str) -> bool:
    """True for a path of another repository (:data:`EXTERNAL_DOCS`) on a line that names that repository."""
    return any(token.endswith(path) and repo in line for path, repo in EXTERNAL_DOCS.items())


def _check_sections(where: str, refs: str, sections: dict[int, str]) -> list[str]:
    out = []
    for number, title in _REF_ITEM.findall(refs):
        n = int(number)
        if n not in sections:
            out.append(f"{where}: {DESIGN} has no section {SECTION}{n} "
                       f"(it has {SECTION}1-{SECTION}{max(sections, default=0)})")
        elif title and title[:1].isupper() and not sections[n].startswith(_norm_title(title)):
            out.append(f"{where}: {DESIGN} {SECTION}{n} is titled \"{sections[n]}\", not \"{title}\"")
    return out


def tracked_files(root: Path) -> list[str]:
    """``git ls-files`` of ``root``; skips the test (with the reason) where git or the checkout is missing."""
    git = shutil.which("git")
    if git is None:
        pytest.skip("git is not installed: the tracked files cannot be listed")
    proc = subprocess.run([git, "-C", str(root), "ls-files", "-z"], capture_output=True, timeout=60)
    if proc.returncode != 0:
        pytest.skip(f"{root} is not a git checkout ({proc.stderr.decode(errors='replace').strip()[:200]})")
    return [p for p in proc.stdout.decode("utf-8", errors="surrogateescape").split("\0") if p]


def read_text(path: Path) -> str | None:
    """The file's text, or None for binary (NUL bytes or not UTF-8) and missing files."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


# --------------------------------------------------------------------------------------------- the repository

def test_design_document_has_numbered_sections():
    sections = design_sections(ROOT)
    assert sections, f"{DESIGN} is missing or has no '## N. Title' headings"
    assert sorted(sections) == list(range(1, len(sections) + 1)), f"sections are not numbered 1..N: {sorted(sections)}"


def test_no_tracked_file_cites_a_document_outside_the_repository():
    problems = []
    files = tracked_files(ROOT)
    assert DESIGN in files, f"{DESIGN} is not tracked by git"
    texts = {rel: text for rel in files if (text := read_text(ROOT / rel)) is not None}
    outputs = output_names({rel: text for rel, text in texts.items() if rel.endswith(".py")})
    for rel, text in texts.items():
        problems += find_problems(rel, text, ROOT, outputs)
    assert not problems, "citations of documents that are not in the repository:\n" + "\n".join(problems)


# --------------------------------------------------------------------------------------------- the checker itself

DOC = "DES" + "IGN"  # the synthetic citations below are built from pieces, so that this file's own text
MD = ".m" + "d"       # holds none of them (the repository test above scans it too)
DOCS = "do" + "cs/"
S = SECTION


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    (tmp_path / "docs").mkdir()
    (tmp_path / DESIGN).write_text(f"# Design\n\n## 1. Alpha things\n\ntext {S}2\n\n## 2. Beta\n")
    (tmp_path / f"BENCH{MD}").write_text("# Bench\n\n## Export\n\n### `tiny` runs (fast)\n")
    (tmp_path / "code.py").write_text("")
    return tmp_path


@pytest.mark.parametrize("text", [
    f"see {DOC}{MD} {S}1",                     # not docs/ (a file at the root that does not exist)
    f"see {DOC} {S}2",                         # no file at all
    f"see {DOCS}{DOC}{MD} {S}3",               # no section 3
    f"see {DOCS}{DOC}{MD} {S}1, {S}7",         # the second of a list is missing
    f"see {DOCS}{DOC}{MD} {S}2 (Gamma)",       # wrong title
    "read .." + "/shared/NOTES for the facts",  # a folder beside the repository
    f"see /work/x/NOTES{MD}",                  # an absolute path
    f"see {DOCS}NOTES{MD}",                    # a missing .md file under docs/
    f"see {DOCS}figures/plot.png",             # a missing docs/ file
    f"see OTHER{MD} for more",                 # a missing .md file at the root
    f'see BENCH{MD} "Import"',                 # no such section
])
def test_checker_finds_each_bad_citation(repo: Path, text: str):
    assert find_problems("code.py", text + "\n", repo), text


def test_checker_finds_a_broken_markdown_link_and_a_bad_self_reference(repo: Path):
    assert find_problems(f"README{MD}", "[the notes](notes/missing.txt)\n", repo)
    assert not find_problems(f"README{MD}", f"[design]({DOCS}{DOC}{MD}) and [top](#top)\n", repo)
    assert find_problems(DESIGN, f"as {S}9 says\n", repo)
    assert not find_problems(DESIGN, (repo / DESIGN).read_text(), repo)


@pytest.mark.parametrize("text", [
    f"see {DOCS}{DOC}{MD} {S}2 (Beta) and {S}1 (Alpha)",
    f"see {DOCS}{DOC}{MD} {S}1 (Alpha things), {S}2",
    f"see {DOCS}{DOC}{MD} {S}2 (see the table)",  # lower-case parenthesis: a remark, not a title
    "see https://github.com/onnx/onnx-tensorrt/blob/main/docs/operators.md",  # a URL, not a local path
    f'see BENCH{MD} "Export" and BENCH{MD}, "`tiny` runs"',
    f"see {DOCS} and {DOCS}{DOC}{MD}",
])
def test_checker_accepts_good_citations(repo: Path, text: str):
    assert find_problems("code.py", text + "\n", repo) == []


def test_paths_of_named_other_repositories_are_not_citations(repo: Path):
    assert find_problems("code.py", f"onnx-tensorrt's {DOCS}operators{MD} lists the ops\n", repo) == []
    assert find_problems("code.py", f"see {DOCS}operators{MD}\n", repo)  # without the repository's name


def test_names_the_code_writes_are_not_citations(repo: Path):
    outputs = output_names({"a.py": f'NAME = "NOTES{MD}"\nx = f"{{d}}/OTHER{MD}"\n', "bad.py": "def ("})
    assert outputs == {f"NOTES{MD}"}
    assert find_problems("code.py", f"writes DIR/NOTES{MD} and NOTES{MD}\n", repo, outputs) == []
    assert find_problems("code.py", f"see NOTES{MD}\n", repo)  # without the literal it is a citation
    assert find_problems("code.py", f"see {DOCS}NOTES{MD}\n", repo, outputs)  # docs/ paths must exist


def test_checker_resolves_relative_to_the_citing_file(repo: Path):
    assert find_problems(f"{DOCS}other{MD}", f"[bench](../BENCH{MD}) and {DOC}{MD} {S}1\n", repo) == []
    assert find_problems(f"{DOCS}other{MD}", f"[bench](BENCH{MD})\n", repo)  # links are relative to the file
