"""The report's summary (best method per metric and model against the runner-up,
Holm-corrected), its bold best values, FG-TransMM's chosen variant shown once, the
per-model figures, the Welch test of a constant sample and ``--threads``."""

import io
import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from scipy import stats

from captum_faithful.demo import job, models, report
from captum_faithful.demo.registry import METHODS, Settings, duplicate_rows
from captum_faithful.evaluation import Results
from captum_faithful.evaluation.results import welch_test
from captum_faithful.studies import GatingConfiguration

CHOSEN = GatingConfiguration((1, 2), 0.5, 10.0, "activation")


def _results(values: dict[tuple[str, str], list[float]]) -> Results:
    rows = [
        {"index": i, "method": m, "metric": metric, "value": v, "seconds": 0.25}
        for (m, metric), sample in values.items()
        for i, v in enumerate(sample)
    ]
    methods = list(dict.fromkeys(m for m, _ in values))
    metrics = list(dict.fromkeys(metric for _, metric in values))
    return Results(
        pd.DataFrame(rows), {"settings": {"methods": methods, "metrics": metrics}}
    )


def _outcome(values, quick=False, gating=None, figure_maps=None, demo=None):
    results = _results(values)
    return SimpleNamespace(
        results=results,
        settings=Settings(
            out=Path("unused"), quick=quick, methods=tuple(results.methods)
        ),
        gating=gating,
        figure_maps=figure_maps or {},
        demo=demo,
    )


def _holm_by_hand(pvalues, alpha):
    """Holm's procedure as a decision: reject the smallest p-values while
    p_(k) <= alpha / (m - k + 1)."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    rejected = set()
    for k, i in enumerate(order):
        if pvalues[i] > alpha / (len(pvalues) - k):
            break
        rejected.add(i)
    return rejected


def test_holm_adjustment():
    assert report.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    # NaN stays out of the family: the other two are adjusted as a family of 2
    adjusted = report.holm([0.04, math.nan, 0.01])
    assert math.isnan(adjusted[1]) and adjusted[::2] == pytest.approx([0.04, 0.02])
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        pvalues = (torch.rand(7, generator=generator) ** 3).tolist()
        adjusted = report.holm(pvalues)
        for alpha in (0.01, 0.05, 0.1, 0.3):
            assert {i for i, p in enumerate(adjusted) if p <= alpha} == (
                _holm_by_hand(pvalues, alpha)
            )
        assert all(a >= p for a, p in zip(adjusted, pvalues, strict=True))


def _spread(mean, n, step=0.01):
    return [mean + step * (i - (n - 1) / 2) for i in range(n)]


def test_summary_names_best_and_runner_up_with_holm_corrected_welch_p():
    n = 40
    values = {
        # insertion (higher is better): UNI clearly first on the CNN
        ("uni", "insertion"): _spread(0.9, n),
        ("ig-black", "insertion"): _spread(0.5, n),
        ("saliency", "insertion"): _spread(0.4, n),
        # deletion (lower is better): IG (black) first, barely ahead of saliency
        ("uni", "deletion"): _spread(0.6, n, 0.1),
        ("ig-black", "deletion"): _spread(0.3, n, 0.1),
        ("saliency", "deletion"): _spread(0.31, n, 0.1),
        # the ViT has one method on insertion
        ("transmm", "insertion"): _spread(0.7, n),
    }
    outcome = _outcome(values)
    entries = {(e["metric"], e["model"]): e for e in report.best_versus_next(outcome)}
    assert set(entries) == {
        ("insertion", "cnn"),
        ("deletion", "cnn"),
        ("insertion", "vit"),
    }
    first = entries["insertion", "cnn"]
    second = entries["deletion", "cnn"]
    assert (first["best"], first["next"]) == ("uni", "ig-black")
    assert (second["best"], second["next"]) == ("ig-black", "saliency")
    assert entries["insertion", "vit"]["next"] is None
    p1 = stats.ttest_ind(
        values["uni", "insertion"], values["ig-black", "insertion"], equal_var=False
    ).pvalue
    p2 = stats.ttest_ind(
        values["ig-black", "deletion"], values["saliency", "deletion"], equal_var=False
    ).pvalue
    low, high = sorted([p1, p2])
    # Holm over the two tests
    expected = {p1: 2 * p1 if p1 == low else max(2 * low, high)}
    expected[p2] = 2 * p2 if p2 == low else max(2 * low, high)
    assert first["holm_p"] == pytest.approx(min(1.0, expected[p1]))
    assert second["holm_p"] == pytest.approx(min(1.0, expected[p2]))
    text = "\n".join(report.summary_section(outcome))
    assert "Holm's step-down method over the 2 best-vs-runner-up comparisons" in text
    lines = [
        line for line in text.splitlines() if line.startswith("| insertion AUC (blur)")
    ]
    assert lines == [
        "| insertion AUC (blur) ↑ | UNI: 0.900 | IG (black): 0.500 | **yes** (p = "
        f"{report._pvalue(first['holm_p'])}) | TransMM: 0.700 | – | – (the only "
        "method) |"
    ]
    assert (
        "| deletion AUC (black) ↓ | IG (black): 0.300 | Saliency: 0.310 | no (p = "
        in text
    )
    # the summary comes before the big table, and 40 images are not "little power"
    assert "little power" not in text


def test_quick_summary_says_the_comparisons_have_little_power():
    values = {
        ("uni", "saco"): _spread(0.5, 8),
        ("ig-black", "saco"): _spread(0.4, 8),
    }
    text = "\n".join(report.summary_section(_outcome(values, quick=True)))
    assert (
        "**Only 8 images per method (`--quick`): these comparisons have little power.**"
        in text
    )


def test_ties_and_untestable_comparisons_are_named():
    values = {
        ("uni", "saco"): [0.5, 0.5, 0.5],
        ("ig-black", "saco"): [0.5, 0.5, 0.5],
        ("uni", "insertion"): [0.7, 0.7],
        ("ig-black", "insertion"): [0.6, 0.6],
    }
    entries = report.best_versus_next(_outcome(values))
    verdicts = {e["metric"]: report._verdict(e) for e in entries}
    assert verdicts == {"saco": "tied", "insertion": "not testable"}


def test_best_mean_of_each_column_is_bold_per_model():
    values = {
        ("uni", "deletion"): [0.2, 0.4],
        ("ig-black", "deletion"): [0.5, 0.7],
        ("transmm", "deletion"): [0.8, 0.9],
        ("fei-none-vit", "deletion"): [0.9, 0.95],
    }
    header, rows = report.summary_table(_outcome(values))
    cells = {row[0]: row[2] for row in rows}
    assert cells == {
        "UNI": "**0.300 ± 0.100**",
        "IG (black)": "0.600 ± 0.100",
        "TransMM": "**0.850 ± 0.050**",
        "FEI (none, ViT)": "0.925 ± 0.025",
    }


def _gated_values(n=4):
    # the duplicate row's values deliberately differ from FG-TransMM's: rows are
    # matched by their configuration, not by their values
    return {
        (key, metric): _spread(base, n)
        for key, base in (
            ("transmm", 0.3),
            ("fg-transmm", 0.6),
            ("fg-transmm-combined", 0.5),
            ("fg-transmm-activation", 0.61),
        )
        for metric in ("saco", "insertion")
    }


def test_the_chosen_variant_is_shown_once():
    gating = SimpleNamespace(configuration=CHOSEN)
    methods = ("transmm", "fg-transmm", "fg-transmm-combined", "fg-transmm-activation")
    assert duplicate_rows(methods, gating) == {"fg-transmm-activation": "fg-transmm"}
    assert duplicate_rows(methods, None) == {}
    assert duplicate_rows(methods[::-1], gating) == {
        "fg-transmm": "fg-transmm-activation"
    }
    outcome = _outcome(_gated_values(), gating=gating)
    label = "FG-TransMM = FG-TransMM activation"
    _, rows = report.summary_table(outcome)
    assert [row[0] for row in rows] == ["TransMM", label, "FG-TransMM combined"]
    compared = [(row[0], row[1], row[2]) for row in report.comparison_rows(outcome)]
    assert len(compared) == len(set(compared))
    for metric in ("SaCo", "insertion AUC (blur)"):
        assert (label, "TransMM", metric) in compared
        assert ("FG-TransMM combined", "TransMM", metric) in compared
    assert all("activation" not in a or a == label for a, _, _ in compared)
    assert len(compared) == 4
    text = "\n".join(report.summary_section(outcome))
    assert f"shown once, as {label}" in text
    assert f"| SaCo ↑ | {label}: 0.600 | FG-TransMM combined: 0.500 |" in text
    # another chosen variant: another duplicate, whatever the values
    other = SimpleNamespace(
        configuration=GatingConfiguration((1, 2), 0.5, 10.0, "combined")
    )
    outcome = _outcome(_gated_values(), gating=other)
    _, rows = report.summary_table(outcome)
    assert [row[0] for row in rows] == [
        "TransMM",
        "FG-TransMM = FG-TransMM combined",
        "FG-TransMM activation",
    ]


def _demo(n=8, size=32):
    generator = torch.Generator().manual_seed(1)
    return SimpleNamespace(
        x_test=torch.rand(n, 3, size, size, generator=generator),
        masks_test=(torch.rand(n, 1, size, size, generator=generator) > 0.5).float(),
        y_test=torch.arange(n) % 10,
    )


def test_one_figure_per_model_with_its_methods_each_at_most_1500_pixels_wide():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    keys = list(METHODS)
    maps = {k: torch.randn(6, 3, 32, 32, generator=generator) for k in keys}
    values = {(k, "saco"): [0.1, 0.2] for k in keys}
    outcome = _outcome(
        values,
        gating=SimpleNamespace(configuration=CHOSEN),
        figure_maps=maps,
        demo=_demo(),
    )
    predictions = {"cnn": torch.arange(8) % 3, "vit": torch.arange(8) % 5}
    assert report.figure_models(outcome) == ["cnn", "vit"]
    for model in ("cnn", "vit"):
        fig = report.build_figure(outcome, predictions, model)
        try:
            titles = [ax.get_title().replace("\n", " ") for ax in fig.axes if ax.images]
            shown = [
                k for k in report.shown_methods(outcome) if METHODS[k].model == model
            ]
            assert titles[: 2 + len(shown)] == ["input", "evidence block"] + [
                report.method_label(outcome, k) for k in shown
            ]
            inputs = [ax for ax in fig.axes if ax.images][:: 2 + len(shown)]
            assert [ax.get_xlabel() for ax in inputs] == [
                f"true {int(outcome.demo.y_test[i])}\npredicted "
                f"{int(predictions[model][i])}"
                for i in range(6)
            ]
            heat = [ax for ax in fig.axes if ax.images][2].images[0]
            expected = maps[shown[0]][0].sum(0)
            torch.testing.assert_close(
                torch.as_tensor(heat.get_array().data), expected / expected.abs().max()
            )
            if model == "vit":  # the wider of the two (rendering takes seconds)
                buffer = io.BytesIO()
                fig.savefig(buffer, format="png", dpi=report.FIGURE_DPI)
                width, height = Image.open(buffer).size
                assert 1000 <= width <= 1500 and height <= 1500, (width, height)
        finally:
            plt.close(fig)
    # the ViT figure shows FG-TransMM's chosen variant once
    assert "fg-transmm-activation" not in report.shown_methods(outcome)
    with pytest.raises(ValueError, match="model: expected one of"):
        report.build_figure(outcome, predictions, "rnn")


def test_report_leads_with_the_summary_and_the_figures():
    keys = ["uni", "ig-black", "transmm"]
    values = {(k, m): [0.5, 0.6, 0.9] for k in keys for m in ("saco", "deletion")}
    # a constant sample (UNI's path monotonicity is often 1 on every image)
    values["uni", "path_monotonicity"] = [1.0, 1.0, 1.0]
    values["ig-black", "path_monotonicity"] = [0.2, 0.5, 0.6]
    demo = _demo()
    demo.meta = {"recipe": {"vit_patch_size": 4, "sae_layers": [1]}}
    demo.accuracy = {"cnn": 0.9, "vit": 0.8}
    demo.sae_explained_variance, demo.sae_dead_fraction = {1: 0.9}, {1: 0.0}
    demo.cache_dir = "cache"
    outcome = _outcome(
        values,
        figure_maps={k: torch.randn(6, 3, 32, 32) for k in keys},
        demo=demo,
    )
    outcome.timings, outcome.seconds = {}, 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        text = report.render_report(outcome)
    order = [
        "## Summary",
        "![CNN methods' attribution maps](attributions_cnn.png)",
        "![ViT methods' attribution maps](attributions_vit.png)",
        "## How to read this",
        "## Every method and metric",
        "## Comparisons (Welch's t-test, two-sided)",
        "## Models",
    ]
    assert "The first 6 test images: each input" in text
    positions = [text.index(heading) for heading in order]
    assert positions == sorted(positions)
    assert "| path monotonicity ↑ | UNI: 1.000 | IG (black): 0.433 |" in text


def test_welch_test_of_a_constant_sample_without_warning():
    a, b = [1.0, 1.0, 1.0], [0.5, 0.6, 0.7, 0.9]
    mean_b = sum(b) / len(b)
    var_b = sum((x - mean_b) ** 2 for x in b) / (len(b) - 1)
    # Welch with var_a = 0: t = (mean_a - mean_b) / sqrt(var_b / n_b), df = n_b - 1
    t = (1.0 - mean_b) / math.sqrt(var_b / len(b))
    p = 2 * stats.t.sf(abs(t), len(b) - 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for first, second, sign in ((a, b, 1), (b, a, -1)):
            statistic, df, pvalue = welch_test(first, second)
            assert statistic == pytest.approx(sign * t)
            assert df == pytest.approx(len(b) - 1)
            assert pvalue == pytest.approx(p)
        assert all(math.isnan(v) for v in welch_test(a, [2.0, 2.0]))


def test_threads_option(tmp_path):
    from captum_faithful.cli import build_parser, main

    parser, _ = build_parser()
    assert parser.parse_args(["demo"]).threads is None  # free_cores() at run time
    assert parser.parse_args(["demo", "--threads", "3"]).threads == 3
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--threads", "0", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2


def test_the_job_runs_on_the_requested_threads_and_restores_them(monkeypatch, tmp_path):
    seen = []

    def fake_run(settings):
        seen.append(torch.get_num_threads())
        if settings.seed == 1:
            raise RuntimeError("boom")
        return "done"

    monkeypatch.setattr(job, "_run", fake_run)
    before = torch.get_num_threads()
    assert job.run(Settings(out=tmp_path, threads=3)) == "done"
    with pytest.raises(RuntimeError, match="boom"):
        job.run(Settings(out=tmp_path, threads=2, seed=1))
    assert seen == [3, 2] and torch.get_num_threads() == before
    with pytest.raises(ValueError, match="settings.threads"):
        job.run(Settings(out=tmp_path, threads=0))
    assert len(seen) == 2


def test_training_uses_the_process_threads_at_most_four():
    before = torch.get_num_threads()
    try:
        for requested, expected in ((1, 1), (2, 2), (6, 4)):
            torch.set_num_threads(requested)
            with models._training_threads():
                assert torch.get_num_threads() == expected
            assert torch.get_num_threads() == requested
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    "cores, load, expected",
    [
        (2, 0.05, 2),
        (2, 0.6, 1),
        (2, 1.4, 1),
        (2, 5.0, 1),
        (8, 0.0, 4),
        (8, 6.2, 2),
        (1, 0.0, 1),
    ],
)
def test_default_threads_are_the_free_cores(monkeypatch, cores, load, expected):
    """Cores minus the 1-minute load average, rounded, within [1, 4]: an idle
    2-core machine uses both, a loaded one is not oversubscribed."""
    from captum_faithful.demo import cli

    monkeypatch.setattr(cli.os, "cpu_count", lambda: cores)
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (load, load, load))
    assert cli.free_cores() == expected


def test_default_threads_without_a_load_average_are_one(monkeypatch):
    from captum_faithful.demo import cli

    def unknown():
        raise OSError("no load average here")

    monkeypatch.setattr(cli.os, "getloadavg", unknown)
    assert cli.free_cores() == 1
