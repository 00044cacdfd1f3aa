"""Execute every tutorial notebook and check what it reports.

Each notebook runs in a fresh kernel of this interpreter, from a temporary copy, with
the repository root importable and the session's demo cache (the quick recipe,
trained once per test session by the ``quick_demo`` fixture). Any failing cell fails
the test. The last code cell of every tutorial prints one line
``TUTORIAL_CHECKS {json}`` with the values the notebook computed; the test checks
them against what the methods guarantee.

nbclient/nbformat run in a subprocess with a clean ``sys.path`` (pytest prepends the
test folders, where a test package could shadow a module that nbformat needs, as
``tests/attr`` once shadowed ``attr``); the notebooks are read here as plain JSON.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "tutorials"
NOTEBOOKS = (
    "1_uni_vs_integrated_gradients.ipynb",
    "2_fei_and_clipgrad.ipynb",
    "3_feature_gated_transmm.ipynb",
    "4_evaluating_faithfulness.ipynb",
)
MARKER = "TUTORIAL_CHECKS "
# Executes argv[1] (outputs cleared first) with a `python3` kernel of this interpreter
# and writes the executed notebook to argv[2]; a failing cell raises.
RUNNER = """
import sys
import nbformat
from nbclient import NotebookClient
notebook = nbformat.read(sys.argv[1], as_version=4)
nbformat.validate(notebook)
for cell in notebook.cells:
    if cell.cell_type == "code":
        cell.outputs = []
        cell.execution_count = None
try:
    NotebookClient(notebook, timeout=600, kernel_name="python3").execute()
finally:
    nbformat.write(notebook, sys.argv[2])
"""


def _read(path: Path) -> dict:
    notebook = json.loads(path.read_text(encoding="utf-8"))
    assert notebook["nbformat"] == 4
    return notebook


def _text(output: dict) -> str:
    text = output.get("text", "")
    return "".join(text) if isinstance(text, list) else text


def _code_cells(notebook: dict) -> list[dict]:
    return [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]


def _checks(notebook: dict) -> dict:
    """The JSON printed after ``TUTORIAL_CHECKS`` by the notebook's last code cell."""
    last = _code_cells(notebook)[-1]
    lines = [
        line
        for output in last.get("outputs", [])
        if output.get("output_type") == "stream"
        for line in _text(output).splitlines()
        if line.startswith(MARKER)
    ]
    assert len(lines) == 1, f"the last cell must print one {MARKER!r} line, got {lines}"
    return json.loads(lines[0][len(MARKER) :])


def _execute(name: str, workdir: Path) -> dict:
    executed = workdir / f"executed_{name}"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *filter(None, [env.get("PYTHONPATH")])]
    )
    run = subprocess.run(
        [sys.executable, "-c", RUNNER, str(TUTORIALS / name), str(executed)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, f"{name} failed:\n{run.stderr[-6000:]}"
    return _read(executed)


def _assert_unit_interval(values, name: str) -> None:
    for method, value in values.items():
        assert 0.0 <= value <= 1.0, f"{name} of {method} is {value}, outside [0, 1]"


def _check_uni(checks: dict) -> None:
    # ‖x' − x‖₂ = ε for every learned baseline (Algorithm 1 projects onto the sphere).
    assert checks["baseline_distances"], "no learned baselines measured"
    for distance in checks["baseline_distances"]:
        assert math.isclose(distance, checks["epsilon"], rel_tol=1e-3)
    # Completeness of the right Riemann sum: |Σ attribution − Δf| small relative to Δf.
    assert checks["max_relative_delta"] < 0.5
    assert checks["noise_tunnel_shape"] == checks["input_shape"]
    monotonicity = checks["path_monotonicity"]
    assert set(monotonicity) == {"black", "blur", "uni"}
    for value in monotonicity.values():
        assert -1.0 <= value <= 1.0
    # The UNI paper's claim: the short learned path is (close to) monotone, at least as
    # monotone as the path from black.
    assert monotonicity["uni"] > 0.95
    assert monotonicity["uni"] >= monotonicity["black"]
    _assert_unit_interval(checks["evidence_share"], "evidence share")


def _check_fei(checks: dict) -> None:
    assert checks["nested"], "quantile maps must be nested, α_1 ≤ … ≤ α_K"
    for level, coverage in zip(checks["levels"], checks["coverage"], strict=True):
        assert abs(level - coverage) < 0.1, (level, coverage)
    assert set(checks["deviation_mse"]) == {"none", "vm", "ibm"}
    # ClipGrad keeps the activations closer to the clean ones than the unconstrained game.
    assert checks["deviation_mse"]["vm"] < checks["deviation_mse"]["none"]
    blank = checks["blank_probability"]
    assert blank["vm"] < blank["none"]
    _assert_unit_interval(blank, "blank-image probability")
    # ClipGrad zeroes exactly the entries the "vm" rule names, and some of them.
    assert checks["clipgrad_matches_rule"]
    assert checks["clipgrad_zeroed_fraction"] > 0.0


def _check_transmm(checks: dict) -> None:
    # c_max = 1 gives unit gates: Feature-Gated TransMM equals TransMM.
    assert checks["cmax1_equals_transmm"]
    gates = checks["gate_range"]
    assert set(gates) == {str(layer) for layer in checks["sae_layers"]}
    for low, high in gates.values():
        assert 1 / checks["c_max"] - 1e-6 <= low <= high <= checks["c_max"] + 1e-6
    assert checks["shuffled_differs"], "the shuffled decoder must change the gates"
    for value in checks["insertion"].values():
        assert 0.0 <= value <= 1.0
    # select_gating chose the best validation mean of its grid
    means = [m for m in checks["selection_means"] if not math.isnan(m)]
    assert checks["selection_score"] == max(means)


def _check_evaluation(checks: dict) -> None:
    metrics = set(checks["metrics"])
    assert {
        "insertion_auc",
        "deletion_auc",
        "saco",
        "faithfulness_correlation",
        "path_monotonicity",
        "activation_deviation",
        "parameter_randomization",
        "infidelity",
    } <= metrics
    assert len(checks["methods"]) >= 4
    # Every (method, metric) cell the notebook filled is a finite number.
    for method, row in checks["table"].items():
        for metric, value in row.items():
            assert value is None or math.isfinite(value), (method, metric, value)
    # evaluate() wrote one row per image × method × metric.
    assert checks["evaluate_rows"] == checks["evaluate_expected_rows"]


CHECKS = dict(
    zip(
        NOTEBOOKS,
        (_check_uni, _check_fei, _check_transmm, _check_evaluation),
        strict=True,
    )
)


def test_every_tutorial_is_tested():
    assert sorted(p.name for p in TUTORIALS.glob("*.ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_stored_notebook_has_outputs(name):
    """The committed notebook is executed, error-free, and shows its figures."""
    notebook = _read(TUTORIALS / name)
    code = _code_cells(notebook)
    assert code and all(cell["execution_count"] for cell in code), "unexecuted cells"
    outputs = [output for cell in code for output in cell["outputs"]]
    assert not [o for o in outputs if o["output_type"] == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "no figure stored"
    _checks(notebook)


@pytest.mark.slow  # executes the notebook on the quick demo, trained in the session
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_tutorial_executes(name, quick_demo, tmp_path):
    assert quick_demo.cache_dir is not None
    notebook = _execute(name, tmp_path)
    checks = _checks(notebook)
    assert checks["quick"] is True
    # The kernel ran this interpreter (the package under test, not another install).
    assert Path(checks["python"]).resolve() == Path(sys.executable).resolve()
    CHECKS[name](checks)
