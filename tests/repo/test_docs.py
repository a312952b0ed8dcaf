"""The project stands alone: no file points to a document outside it, every reference to a section of a
page (README.md, docs/*.md) names a heading that exists, and every relative link in them leads to a file."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.conftest import ROOT

OUTSIDE = re.compile(r"DESIGN\.md|ALGORITHMS\.md|ENVIRONMENT\.md|seeds/0\d\d|\b[Ss]eeds? 00\d|\.\./shared\b")
SECTION = re.compile(r'((?:docs/[\w-]+|README)\.md),\s+"([^"]+)"')


def tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    files = [ROOT / n for n in names if not n.startswith("key_results/") or n.endswith(".md")]
    return [f for f in files if f.is_file() and f.suffix not in (".png", ".pt", ".gz", ".npy", ".bin", ".whl")]


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except UnicodeDecodeError:
        return ""


def _headings(path: Path) -> set[str]:
    return {m.group(1).strip() for m in re.finditer(r"^#+ (.+)$", (ROOT / path).read_text(), re.MULTILINE)}


def test_no_file_refers_to_a_document_outside_the_project() -> None:
    found = [f"{path.relative_to(ROOT)}:{text[:m.start()].count(chr(10)) + 1}: {m.group(0)}"
             for path in tracked_text_files() if path.name != "test_docs.py"
             for text in [_text(path)] for m in OUTSIDE.finditer(text)]
    assert not found, "references to documents outside the project:\n" + "\n".join(found)


def test_every_section_reference_names_a_heading() -> None:
    wrong = []
    for path in tracked_text_files():
        for m in SECTION.finditer(_text(path)):
            name = " ".join(m.group(2).replace("\t", " ").split())  # a Kconfig help line may wrap inside it
            page = ROOT / m.group(1)
            if not page.is_file() or name not in _headings(page):
                wrong.append(f"{path.relative_to(ROOT)}: {m.group(1)}, \"{name}\"")
    assert not wrong, "sections that do not exist:\n" + "\n".join(wrong)


def test_every_relative_link_of_the_documentation_leads_to_a_file() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = [f"{page.relative_to(ROOT)}: {target}" for page in pages
              for target in re.findall(r"\]\(([^)#\s]+)", page.read_text())
              if not target.startswith(("http://", "https://")) and not (page.parent / target).exists()]
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_readme_is_a_front_door() -> None:
    """At most 300 lines; what it no longer holds is one link away."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"(docs/{page.name})" in readme, f"docs/{page.name} is not linked from the README"
