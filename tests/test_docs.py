"""The documentation's cross-references: every formula a comment cites is in docs/formulas.md.

Code comments cite a formula as `formulas.md §Name`, where Name is a section heading of
docs/formulas.md; the docs link to those sections as `formulas.md#anchor`. Both must resolve,
so renaming a section without its citations (or citing one that does not exist) fails here.
"""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE_DIRS = ("csrc", "cnnops", "tests", "benchmarks", "scripts", "docs")
SOURCE_SUFFIXES = (".h", ".cpp", ".cu", ".cuh", ".py", ".sh", ".md")


def _read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def _headings():
    return re.findall(r"^## (.+?)\s*$", _read("docs/formulas.md"), re.M)


def _anchor(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def _documented_files():
    files = ["README.md", "CONTRIBUTING.md"]
    for top in SOURCE_DIRS:
        for folder, _, names in os.walk(os.path.join(ROOT, top)):
            files += [os.path.relpath(os.path.join(folder, n), ROOT) for n in names if n.endswith(SOURCE_SUFFIXES)]
    return sorted(f for f in files if os.path.isfile(os.path.join(ROOT, f)) and f != "tests/test_docs.py")


def test_formulas_headings_are_unique():
    headings = _headings()
    assert len(headings) >= 10 and len(set(headings)) == len(headings), headings


def test_every_formula_citation_names_a_section():
    headings = _headings()
    bad = []
    for path in _documented_files():
        for m in re.finditer(r"§\s*([^\n]*)", _read(path)):
            rest = m.group(1)
            if not any(rest.startswith(h) and not rest[len(h):len(h) + 1].isalnum() for h in headings):
                bad.append(f"{path}: §{rest[:40]}")
    assert not bad, "citations of sections docs/formulas.md does not have:\n" + "\n".join(bad)


def test_every_formulas_link_names_an_anchor():
    anchors = {_anchor(h) for h in _headings()}
    bad = []
    for path in _documented_files():
        for anchor in re.findall(r"formulas\.md#([\w-]+)", _read(path)):
            if anchor not in anchors:
                bad.append(f"{path}: #{anchor}")
    assert not bad, f"links to anchors docs/formulas.md does not have: {bad}"


@pytest.mark.parametrize("path", ["README.md", "CONTRIBUTING.md", "docs/support.md", "docs/architecture.md",
                                  "docs/formulas.md"])
def test_no_machine_paths(path):
    text = _read(path)
    assert not re.search(r"(?<![\w.])/(work|home|root|tmp)/", text), f"{path} names a path of one machine"
