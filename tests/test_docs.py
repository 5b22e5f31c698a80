"""The repository is self-contained: nothing points outside it, every doc a file names exists, and every
"§N.M" citation names a section of docs/methods.md.

A user has only the repository. Design notes outside it (a shared folder beside the checkout, a spec)
must never be cited; the docs they would need are docs/methods.md, docs/experiments.md and docs/benchmarks.md.
"""
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEXT = (".py", ".md", ".c", ".h", ".cu", ".toml", ".cfg", ".txt", ".ipynb")
# files a run writes, named in the docs but never in the repository
GENERATED = {"report.md"}
MD_REF = re.compile(r"(?<![\w.-])((?:[\w.-]+/)*[\w.-]+\.md)\b")
SECTION_REF = re.compile(r"§\s?(\d+(?:\.\d+)*[a-z]?)(?:\s?[–-]\s?(\d+(?:\.\d+)*))?")


def tracked_text_files():
    """Every file git tracks (and every new file it would track) that is text, with its contents."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the file list comes from git", allow_module_level=True)
    files = {}
    for name in out:
        path = ROOT / name
        if path.suffix in TEXT or name in ("Makefile", ".ci/run"):
            try:
                files[name] = path.read_text(encoding="utf-8")
            except (FileNotFoundError, UnicodeDecodeError):
                continue
    return files


FILES = tracked_text_files()


def methods_sections() -> set:
    """The numbers of docs/methods.md's sections: '0', '1', '1.1', …, '5.7a'."""
    heads = re.findall(r"^#{2,3} (\d+(?:\.\d+)?[a-z]?)[. ]", (ROOT / "docs/methods.md").read_text(), re.M)
    return set(heads)


def test_nothing_points_outside_the_repository():
    bad = [f"{name}:{i}: {line.strip()}" for name, text in FILES.items() if name != "tests/test_docs.py"
           for i, line in enumerate(text.splitlines(), 1) if re.search(r"\.\.[/]shared|shared[/]spec", line)]
    assert not bad, "references to files outside the repository (move what they need into docs/):\n" + "\n".join(bad)


def resolves(ref: str, name: str) -> bool:
    """A .md reference exists: relative to the repository root, to the citing file, or (a bare name) in docs/."""
    if Path(ref).name in GENERATED or ref.startswith("runs/"):
        return True
    candidates = [ROOT / ref, (ROOT / name).parent / ref]
    if "/" not in ref:
        candidates.append(ROOT / "docs" / ref)
    return any(c.is_file() for c in candidates)


def test_every_doc_a_file_names_exists():
    bad = [f"{name}:{i}: {ref}" for name, text in FILES.items() if name != "tests/test_docs.py"
           for i, line in enumerate(text.splitlines(), 1) for ref in MD_REF.findall(line)
           if not resolves(ref, name)]
    assert not bad, "these files name docs that are not in the repository:\n" + "\n".join(bad)


def test_every_section_citation_names_a_section_of_methods_md():
    """'§2.4', '§1.1–1.4', '§6.8.2' (invariant 2 of §6.8): every cited section heading exists."""
    sections = methods_sections()
    assert {"0", "1.4", "2.10", "5.7a", "8.5"} <= sections
    bad = []
    for name, text in FILES.items():
        if name.startswith("docs/") and name != "docs/methods.md" or name == "tests/test_docs.py":
            continue
        for i, line in enumerate(text.splitlines(), 1):
            for first, last in SECTION_REF.findall(line):
                for ref in filter(None, (first, last)):
                    parts = ref.split(".")
                    section = ".".join(parts[:2])  # §6.8.2 is item 2 of §6.8
                    if section not in sections:
                        bad.append(f"{name}:{i}: §{ref}")
    assert not bad, "citations of sections that docs/methods.md does not have:\n" + "\n".join(bad)


def test_the_reference_check_catches_what_it_should():
    assert not resolves("docs/no_such_page.md", "README.md")
    assert not resolves("no_such_spec.md", "README.md")
    assert resolves("docs/methods.md", "tinyslim/adapters/slim.py") and resolves("methods.md", "README.md")
    assert resolves("runs/demo/report.md", "README.md")
    assert SECTION_REF.findall("(docs/methods.md §1.1–1.4)") == [("1.1", "1.4")]


def test_every_config_table_of_methods_md_matches_its_dataclass():
    """A "### N.M Config (`XConfig`)" table lists fields of XConfig only, and every field of XConfig
    appears in its section: the docs cannot keep a knob the code dropped, or miss one it added."""
    import dataclasses

    import tinyslim.adapters as adapters

    text = (ROOT / "docs/methods.md").read_text()
    sections = re.split(r"^(?=#{2,3} )", text, flags=re.M)
    checked = []
    for section in sections:
        head = re.match(r"### [\d.]+ Config \(`(\w+)`\)", section)
        if not head:
            continue
        cls = getattr(adapters, head[1])
        fields = {f.name for f in dataclasses.fields(cls)}
        listed = {name for row in re.findall(r"^\| ([^|]+)\|", section, re.M)
                  for name in re.findall(r"`(\w+)`", row)}
        assert listed <= fields, f"{head[1]}: docs/methods.md lists {sorted(listed - fields)}, which the class lacks"
        missing = [f for f in sorted(fields) if f"`{f}`" not in section]
        assert not missing, f"{head[1]}: fields {missing} are not described in docs/methods.md"
        checked.append(head[1])
    assert len(checked) >= 6, checked


def test_every_source_file_the_docs_name_exists():
    """`tinyslim/experiments/suite.py`, `continual.py`: a path (or the end of one) of a file in the repository."""
    paths = set(FILES)
    bad = []
    for name, text in FILES.items():
        if not (name.startswith("docs/") or name == "README.md"):
            continue
        for ref in re.findall(r"`((?:[\w.-]+/)*[\w.-]+\.(?:py|c|h|cu))`", text):
            if not any(p == ref or p.endswith("/" + ref) for p in paths):
                bad.append(f"{name}: {ref}")
    assert not bad, "the docs name source files that do not exist:\n" + "\n".join(bad)
