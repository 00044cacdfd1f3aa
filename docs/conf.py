"""Sphinx configuration of the captum-faithful documentation (``make docs``).

The tutorials are rendered from their stored outputs (never executed here): they are
copied from ``../tutorials`` into ``tutorials/notebooks`` at the start of each build.
The command-line help pages are generated from the parser, so they are always the
text ``--help`` prints.

The site is read offline: MathJax is not loaded from a CDN but installed with npm
into ``_mathjax`` (once, a cache outside version control) and the files the pages
load are copied into the site's ``_static/mathjax``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import captum_faithful  # noqa: E402

project = "captum-faithful"
author = "the captum-faithful developers"
copyright = "the captum-faithful developers"  # noqa: A001 - Sphinx's name
release = version = captum_faithful.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_nb",
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "_mathjax", "_generated/*.txt", "**.ipynb_checkpoints"]
templates_path = ["_templates"]

# API reference: one page per public name, listed from each module's ``__all__``.
autosummary_generate = True
autosummary_ignore_module_all = False
autosummary_imported_members = True
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autoclass_content = "both"  # the class docstring, then __init__'s Args (Captum's way)
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autodoc_inherit_docstrings = False
# Heavy optional dependencies are imported lazily by the package; nothing to mock.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# Notebooks: stored outputs only.
nb_execution_mode = "off"
nb_merge_streams = True
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3

html_theme = "furo"
html_title = f"captum-faithful {release}"
html_static_path = ["_mathjax/site"]  # holds mathjax/, copied to _static/mathjax

# MathJax 3, bundled: its single-file component loads its fonts (and, when a page
# needs them, TeX extensions; the accessibility tools when the reader turns them on
# in its menu) from folders next to itself, which are copied with it. MathJax 4,
# Sphinx's default, keeps its fonts in a second npm package
# (@mathjax/mathjax-newcm-font) loaded in pieces at read time, whose location would
# need configuring; 3 needs none, and myst-nb's MathJax options work with both.
MATHJAX_VERSION = "3.2.2"
mathjax_path = "mathjax/tex-mml-chtml.js"  # relative: under _static
MATHJAX_FILES = [  # what the page loads, relative to mathjax's es5 folder
    "tex-mml-chtml.js",
    "output/chtml/fonts/woff-v2",
    "input/tex/extensions",
    "ui",
    "a11y",
    "sre",
]


def _copy_tutorials() -> None:
    """Copy the stored notebooks next to the sources (a generated folder)."""
    target = HERE / "tutorials" / "notebooks"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for notebook in sorted((ROOT / "tutorials").glob("*.ipynb")):
        shutil.copy2(notebook, target / notebook.name)


def _write_cli_help() -> None:
    """The ``--help`` text of the console script and each subcommand."""
    from captum_faithful.cli import build_parser

    folder = HERE / "_generated"
    folder.mkdir(exist_ok=True)
    os.environ["COLUMNS"] = "88"  # argparse wraps to the terminal; fix the width
    parser, commands = build_parser()
    for name, argv in [("captum-faithful", []), *[(c, [c]) for c in commands]]:
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer), contextlib.suppress(SystemExit):
            parser.parse_args([*argv, "--help"])
        text = buffer.getvalue()
        # the cache folder is the builder's; show the default location
        from captum_faithful.demo.models import cache_root

        text = text.replace(str(cache_root()), "~/.cache/captum_faithful")
        (folder / f"help-{name}.txt").write_text(text, encoding="utf-8")


def _bundle_mathjax() -> None:
    """Install MathJax from npm (unless cached) and copy what the pages load."""
    cache = HERE / "_mathjax"
    package = cache / "node_modules" / "mathjax"
    manifest = package / "package.json"
    installed = (
        json.loads(manifest.read_text())["version"] if manifest.exists() else None
    )
    if installed != MATHJAX_VERSION:
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError(
                f"the documentation bundles MathJax {MATHJAX_VERSION} from npm, and "
                f"`npm` is not on the PATH; install Node.js (npm), or run `npm install "
                f"--prefix docs/_mathjax mathjax@{MATHJAX_VERSION}` elsewhere"
            )
        subprocess.run(
            [
                npm, "install", "--prefix", str(cache), "--no-save", "--no-package-lock",
                "--no-audit", "--no-fund", "--loglevel=error",
                f"mathjax@{MATHJAX_VERSION}",
            ],
            check=True,
        )  # fmt: skip
    target = cache / "site" / "mathjax"
    shutil.rmtree(target, ignore_errors=True)
    for name in MATHJAX_FILES:
        source = package / "es5" / name
        if source.is_dir():
            shutil.copytree(source, target / name)
        else:
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    shutil.copy2(package / "LICENSE", target / "LICENSE")


_copy_tutorials()
_write_cli_help()
_bundle_mathjax()
