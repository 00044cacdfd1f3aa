"""Sphinx configuration of the captum-faithful documentation (``make docs``).

The tutorials are rendered from their stored outputs (never executed here): they are
copied from ``../tutorials`` into ``tutorials/notebooks`` at the start of each build.
The command-line help pages are generated from the parser, so they are always the
text ``--help`` prints.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
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
exclude_patterns = ["_build", "_generated/*.txt", "**.ipynb_checkpoints"]
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
html_static_path: list[str] = []


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


_copy_tutorials()
_write_cli_help()
