"""Checks the built distributions in ``dist/`` the way a stranger would use them.

The wheel is installed (without its dependencies, which this Python already has)
into a scratch folder, and the README's Quickstart (its first ``python`` block) runs
from another scratch folder with only that install on the path: a module or a data
file missing from the wheel fails here, not on a user's machine. The wheel and the
sdist must carry the licence, the sdist the whole test suite (MANIFEST.in).

Usage: ``python .ci/check_dist.py [DIST_FOLDER]`` (``make dist`` runs it).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    if len(found) != 1:
        sys.exit(f"expected one {pattern} in {folder}, found {[p.name for p in found]}")
    return found[0]


def check_wheel_files(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    if not any(n.endswith(".dist-info/licenses/LICENSE") for n in names):
        sys.exit(f"{wheel.name} has no LICENSE in its dist-info/licenses")
    if "captum_faithful/py.typed" not in names:
        sys.exit(f"{wheel.name} has no captum_faithful/py.typed (PEP 561 marker)")
    unexpected = {t for t in tops if not t.startswith("captum_faithful")}
    if unexpected:
        sys.exit(f"{wheel.name} installs more than the package: {sorted(unexpected)}")


def check_sdist_files(sdist: Path) -> None:
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    tracked = subprocess.run(
        ["git", "ls-files", "tests", "LICENSE"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    # outside a git checkout (an unpacked sdist) the working tree is the reference
    expected = tracked or [
        str(p.relative_to(ROOT))
        for p in (ROOT / "tests").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    ] + ["LICENSE"]
    missing = sorted(set(expected) - names)
    if missing:
        sys.exit(
            f"{sdist.name} lacks {len(missing)} files of the suite: {missing[:10]}"
        )


def run_quickstart(wheel: Path) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quickstart = re.search(r"```python\n(.*?)```", readme, flags=re.S).group(1)
    with tempfile.TemporaryDirectory() as site, tempfile.TemporaryDirectory() as cwd:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                "--no-compile",
                "--target",
                site,
                str(wheel),
            ],
            check=True,
        )
        check = (
            "\nimport captum_faithful, pathlib\n"
            "where = pathlib.Path(captum_faithful.__file__).resolve()\n"
            f"assert where.is_relative_to(pathlib.Path({site!r}).resolve()), where\n"
            "print('ran from', where.parent)\n"
        )
        env = {**os.environ, "PYTHONPATH": site, "PYTHONNOUSERSITE": "1"}
        ran = subprocess.run(
            [sys.executable, "-c", quickstart + check], cwd=cwd, env=env
        )
        if ran.returncode:
            sys.exit("the README's Quickstart failed with the installed wheel (above)")


def main() -> None:
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "dist"
    wheel = one(folder, "*.whl")
    sdist = one(folder, "*.tar.gz")
    check_wheel_files(wheel)
    check_sdist_files(sdist)
    run_quickstart(wheel)
    print(f"{wheel.name} and {sdist.name}: contents and the README's Quickstart pass")


if __name__ == "__main__":
    main()
