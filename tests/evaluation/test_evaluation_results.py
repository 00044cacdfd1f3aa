import math

import numpy as np
import pandas as pd
import pytest
import scipy.stats as scipy_stats

from captum_faithful.evaluation import Results


def _table():
    rng = np.random.default_rng(0)
    rows = []
    values = {
        ("a", "ins"): rng.normal(0.6, 0.1, 30),
        ("b", "ins"): rng.normal(0.5, 0.3, 30),
        ("c", "ins"): rng.normal(0.6, 0.1, 30),
        ("a", "sac"): rng.normal(0.2, 0.2, 30),
        ("b", "sac"): rng.normal(0.1, 0.2, 30),
        ("c", "sac"): rng.normal(0.0, 0.05, 30),
    }
    values["b", "sac"][[3, 7]] = np.nan
    seconds = {"a": 0.5, "b": 0.25, "c": 1.0}
    for index in range(30):
        for method in "abc":
            for metric in ("ins", "sac"):
                rows.append(
                    (
                        index,
                        method,
                        metric,
                        values[method, metric][index],
                        seconds[method],
                    )
                )
    table = pd.DataFrame(
        rows, columns=["index", "method", "metric", "value", "seconds"]
    )
    return table, values


def test_summary_is_mean_and_standard_error_without_nan():
    table, values = _table()
    summary = Results(table).summary()
    assert list(summary.index) == [(m, k) for m in "abc" for k in ("ins", "sac")]
    for (method, metric), v in values.items():
        v = v[~np.isnan(v)]
        row = summary.loc[(method, metric)]
        assert row["n"] == len(v)
        assert row["mean"] == pytest.approx(v.mean(), rel=1e-12)
        assert row["sem"] == pytest.approx(v.std(ddof=1) / math.sqrt(len(v)), rel=1e-12)
    assert summary.loc[("b", "sac")]["n"] == 28
    assert summary.loc[("c", "ins")]["seconds"] == 1.0


def test_compare_matches_scipy_welch():
    table, values = _table()
    results = Results(table)
    for a, b, metric in [("a", "b", "ins"), ("a", "c", "ins"), ("b", "c", "sac")]:
        test = results.compare(a, b, metric)
        va = values[a, metric][~np.isnan(values[a, metric])]
        vb = values[b, metric][~np.isnan(values[b, metric])]
        expected = scipy_stats.ttest_ind(va, vb, equal_var=False)
        assert test.statistic == pytest.approx(expected.statistic, rel=1e-10)
        assert test.pvalue == pytest.approx(expected.pvalue, rel=1e-8)
        se_a, se_b = va.var(ddof=1) / len(va), vb.var(ddof=1) / len(vb)
        welch_df = (se_a + se_b) ** 2 / (
            se_a**2 / (len(va) - 1) + se_b**2 / (len(vb) - 1)
        )
        assert test.df == pytest.approx(welch_df, rel=1e-10)
        assert test.difference == pytest.approx(va.mean() - vb.mean(), rel=1e-12)
        assert (test.n_a, test.n_b) == (len(va), len(vb))
    with pytest.raises(ValueError, match="unknown method 'd'"):
        results.compare("a", "d", "ins")
    with pytest.raises(ValueError, match="unknown metric 'del'"):
        results.compare("a", "b", "del")


def test_welch_degenerate_samples_are_nan():
    """One value, or two constant samples: the statistic is undefined."""
    table = pd.DataFrame(
        [(0, "a", "m", 1.0, 0.1), (0, "b", "m", 1.0, 0.1), (1, "b", "m", 2.0, 0.1)]
        + [(2, "c", "m", 3.0, 0.1), (3, "c", "m", 3.0, 0.1)]
        + [(2, "d", "m", 4.0, 0.1), (3, "d", "m", 4.0, 0.1)],
        columns=["index", "method", "metric", "value", "seconds"],
    )
    results = Results(table)
    for a, b in (("a", "b"), ("c", "d")):
        test = results.compare(a, b, "m")
        assert all(math.isnan(v) for v in (test.statistic, test.df, test.pvalue))


def test_to_markdown_is_a_well_formed_table_with_the_summary_numbers():
    table, _ = _table()
    results = Results(table)
    text = results.to_markdown(digits=3)
    summary = results.summary()
    lines = text.splitlines()
    header = lines.index("| method | ins | sac | s/sample |")
    assert lines[header + 1] == "| --- | ---: | ---: | ---: |"
    row_a = lines[header + 2]
    mean, sem = summary.loc[("a", "ins")][["mean", "sem"]]
    assert row_a.startswith(f"| a | {mean:.3f} ± {sem:.3f} |")
    table_lines = [line for line in lines if line.startswith("|")]
    assert {line.count("|") for line in table_lines[:5]} == {5}
    pairwise = [line for line in table_lines if line.count("|") == 8]
    assert len(pairwise) == 2 + 3 * 2  # header, rule, 3 pairs x 2 metrics
    test = results.compare("b", "c", "sac")
    assert f"| sac | b | c | {test.difference:.3f} | {test.statistic:.3f} |" in text
    assert "30 samples" in lines[0]


def test_results_validates_its_table():
    with pytest.raises(TypeError, match="DataFrame"):
        Results({"index": [0]})
    with pytest.raises(ValueError, match="lacks the columns"):
        Results(pd.DataFrame({"index": [0], "method": ["a"]}))
    with pytest.raises(FileNotFoundError, match="no evaluation run"):
        Results.load("/nonexistent/run")
