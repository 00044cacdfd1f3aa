"""Checks that the built site loads nothing from the network when it is read.

Every ``.html`` file under the site folder is parsed; a ``<script src>``, a
stylesheet, preload or icon ``<link href>``, or an ``<img>``, ``<iframe>``,
``<source>``, ``<video>``, ``<audio>``, ``<embed>`` or ``<object>`` whose address is
absolute (``http:``, ``https:`` or protocol-relative ``//``) fails the check, as does
an ``@import`` or ``url(...)`` of such an address in an inline ``<style>`` or in a
``.css`` file of the site. Plain links (``<a href>``) are not loads and are allowed.
Each offending file is named with the address it would fetch.

Usage: ``python .ci/check_offline_html.py [SITE_FOLDER]`` (``make docs`` runs it on
``docs/_build/html``).
"""

from __future__ import annotations

import re
import sys
from html.parser import HTMLParser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REMOTE = re.compile(r"^\s*(?:https?:)?//", re.IGNORECASE)
CSS_REMOTE = re.compile(
    r"""(?:@import\s+(?:url\()?|url\()\s*["']?((?:https?:)?//[^"')\s]+)""",
    re.IGNORECASE,
)
# tag -> attributes whose address the browser fetches on its own
FETCHED = {
    "script": ("src",),
    "img": ("src", "srcset"),
    "iframe": ("src",),
    "source": ("src", "srcset"),
    "video": ("src", "poster"),
    "audio": ("src",),
    "embed": ("src",),
    "object": ("data",),
    "track": ("src",),
}
# <link rel=...> values that make the browser fetch href
FETCHED_LINKS = {"stylesheet", "preload", "modulepreload", "icon", "manifest", "import"}


class _Loads(HTMLParser):
    """Collects the remote addresses one HTML page would load."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.remote: list[str] = []
        self._in_style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name.lower(): value or "" for name, value in attrs}
        names: tuple[str, ...] = FETCHED.get(tag, ())
        if tag == "link":
            rels = set(values.get("rel", "").lower().split())
            if rels & FETCHED_LINKS or any(rel.endswith("-icon") for rel in rels):
                names = ("href",)
        for name in names:
            value = values.get(name, "")
            # a srcset lists "address width" candidates separated by commas
            addresses = value.split(",") if name == "srcset" else [value]
            for address in (a.split()[0] if a.split() else "" for a in addresses):
                if REMOTE.match(address):
                    self.remote.append(f"<{tag} {name}={address}>")
        self.remote.extend(f"<{tag} style> {m}" for m in _css(values.get("style", "")))
        self._in_style = tag == "style"

    def handle_endtag(self, tag: str) -> None:
        if tag == "style":
            self._in_style = False

    def handle_data(self, data: str) -> None:
        if self._in_style:
            self.remote.extend(f"<style> {m}" for m in _css(data))


def _css(text: str) -> list[str]:
    return CSS_REMOTE.findall(text)


def remote_loads(site: Path) -> list[tuple[Path, str]]:
    """Every (file, address) of the site that would be fetched from the network."""
    found: list[tuple[Path, str]] = []
    for page in sorted(site.rglob("*.html")):
        parser = _Loads()
        parser.feed(page.read_text(encoding="utf-8", errors="replace"))
        parser.close()
        found.extend((page, address) for address in parser.remote)
    for sheet in sorted(site.rglob("*.css")):
        text = sheet.read_text(encoding="utf-8", errors="replace")
        found.extend((sheet, f"css {address}") for address in _css(text))
    return found


def main(argv: list[str]) -> int:
    site = Path(argv[1]) if len(argv) > 1 else ROOT / "docs" / "_build" / "html"
    if not site.is_dir() or not any(site.rglob("*.html")):
        print(f"no built site in {site} (run `make docs` first)", file=sys.stderr)
        return 2
    found = remote_loads(site)
    for page, address in found:
        print(f"{page.relative_to(site)}: loads {address}", file=sys.stderr)
    pages = sum(1 for _ in site.rglob("*.html"))
    if found:
        files = len({page for page, _ in found})
        print(
            f"{len(found)} remote load(s) in {files} file(s) of {site}: the site must "
            "work offline (bundle the file and reference it by a relative path)",
            file=sys.stderr,
        )
        return 1
    print(f"{pages} pages in {site}: nothing is loaded from the network")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
