"""The docs' offline check (.ci/check_offline_html.py) finds every remote load.

Small synthetic sites: each kind of load the browser makes on its own, with an
absolute address, must be reported with its file; the same pages with relative
addresses, and plain links to other sites, must pass.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _checker():
    spec = importlib.util.spec_from_file_location(
        "check_offline_html", ROOT / ".ci" / "check_offline_html.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check = _checker()

REMOTE_PAGES = {
    "script": '<script defer src="https://cdn.example.org/mathjax.js"></script>',
    "protocol-relative": '<script src="//cdn.example.org/x.js"></script>',
    "stylesheet": '<link rel="stylesheet" href="http://fonts.example.org/a.css">',
    "preload": '<link rel="preload" as="font" href="https://example.org/f.woff2">',
    "icon": '<link rel="shortcut icon" href="https://example.org/favicon.ico">',
    "image": '<p><img alt="x" src="https://example.org/x.png"></p>',
    "srcset": '<img src="a.png" srcset="a2.png 2x, https://example.org/b.png 3x">',
    "iframe": '<iframe src="https://example.org/embed"></iframe>',
    "style-import": "<style>@import url('https://example.org/s.css');</style>",
    "style-attribute": '<div style="background: url(https://example.org/bg.png)">',
}


def _site(tmp_path: Path, body: str, name: str = "page.html") -> Path:
    page = tmp_path / "site" / "sub" / name
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(f"<!doctype html><html><head></head><body>{body}</body></html>")
    return tmp_path / "site"


@pytest.mark.parametrize("kind", sorted(REMOTE_PAGES))
def test_each_remote_load_is_reported_with_its_file(tmp_path, kind, capsys):
    site = _site(tmp_path, REMOTE_PAGES[kind])
    found = check.remote_loads(site)
    assert len(found) == 1
    page, address = found[0]
    assert page == site / "sub" / "page.html"
    assert "example.org" in address
    assert check.main(["check", str(site)]) == 1
    err = capsys.readouterr().err
    assert "sub/page.html: loads" in err and "example.org" in err


def test_remote_css_file_is_reported(tmp_path):
    site = _site(tmp_path, '<link rel="stylesheet" href="../_static/a.css">')
    (site / "_static").mkdir()
    (site / "_static" / "a.css").write_text(
        '@import "https://example.org/x.css";\nbody { color: red }\n'
    )
    found = check.remote_loads(site)
    assert [(p.name, "example.org/x.css" in a) for p, a in found] == [("a.css", True)]


def test_local_loads_and_plain_links_pass(tmp_path, capsys):
    body = (
        '<script src="../_static/mathjax/tex-mml-chtml.js?v=1"></script>'
        '<link rel="stylesheet" href="_static/furo.css">'
        '<link rel="canonical" href="https://example.org/page.html">'
        '<a href="https://captum.ai">Captum</a><img src="data:image/png;base64,AAAA">'
        "<style>body { background: url(img/a.png) }</style>"
        "<p>https://example.org/in-text is text, not a load</p>"
    )
    site = _site(tmp_path, body)
    assert check.remote_loads(site) == []
    assert check.main(["check", str(site)]) == 0
    assert "nothing is loaded from the network" in capsys.readouterr().out


def test_missing_site_is_an_error(tmp_path):
    assert check.main(["check", str(tmp_path / "nothing")]) == 2
