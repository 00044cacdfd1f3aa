"""The documentation's landing page: what the package does, installing, a quickstart
that runs (the README's, which tests/test_readme.py executes), then the tutorials."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INDEX = ROOT / "docs" / "index.md"


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), re.S)


def test_sections_come_in_reading_order():
    text = INDEX.read_text(encoding="utf-8")
    headings = re.findall(r"^## (.+)$", text, flags=re.M)
    assert headings[:3] == ["Installing", "Quickstart", "Tutorials"], headings
    intro = text[: text.index("## Installing")]
    # the page opens with what the package does, not with commands
    assert "```" not in intro
    assert "UnlearnedIntegratedGradients" in intro and "insertion" in intro


def test_quickstart_is_the_tested_readme_quickstart():
    assert python_blocks(INDEX), "the landing page has no python quickstart"
    assert python_blocks(INDEX)[0] == python_blocks(ROOT / "README.md")[0]


def test_every_tutorial_is_linked_from_the_tutorials_section():
    text = INDEX.read_text(encoding="utf-8")
    section = text[
        text.index("## Tutorials") : text.index("\n## ", text.index("## Tutorials"))
    ]
    linked = set(re.findall(r"\{doc\}`tutorials/notebooks/([\w-]+)`", section))
    notebooks = {p.stem for p in (ROOT / "tutorials").glob("*.ipynb")}
    assert notebooks and linked == notebooks


def test_quickstart_and_tutorials_code_fits_the_page():
    """Furo's content column shows about 88 characters of code on a desktop screen
    (the Installing block's longest lines); longer lines scroll, as the make
    commands the landing page used to open with did."""
    text = INDEX.read_text(encoding="utf-8")
    start = text.index("## Quickstart")
    section = text[start : text.index("\n## ", text.index("## Tutorials"))]
    blocks = re.findall(r"```(?:bash|python)\n(.*?)```", section, re.S)
    assert len(blocks) == 2
    for block in blocks:
        for line in block.splitlines():
            assert len(line) <= 88, line
