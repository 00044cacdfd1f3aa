"""The table of an evaluation run and its summaries."""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

from captum_faithful._utils import check_int, markdown_table, optional_import
from captum_faithful.evaluation._storage import COLUMNS, RunStorage


@dataclass(frozen=True)
class WelchTest:
    """Welch's t-test of method ``a`` against method ``b`` on one metric.

    ``difference = mean_a - mean_b``; ``statistic`` is Welch's t, ``df`` the
    Welch-Satterthwaite degrees of freedom and ``pvalue`` two-sided. NaN values of
    the metric (e.g. SaCo on a constant attribution) are left out; ``n_a``/``n_b``
    count the values used.

    Attributes:
        metric (str): The metric's name.
        a (str): The first method's name.
        b (str): The second method's name.
        n_a (int): The number of non-NaN values of ``a``.
        n_b (int): The number of non-NaN values of ``b``.
        mean_a (float): The mean of ``a``'s values.
        mean_b (float): The mean of ``b``'s values.
        difference (float): ``mean_a - mean_b``.
        statistic (float): Welch's t statistic.
        df (float): The Welch-Satterthwaite degrees of freedom.
        pvalue (float): The two-sided p-value.
    """

    metric: str
    a: str
    b: str
    n_a: int
    n_b: int
    mean_a: float
    mean_b: float
    difference: float
    statistic: float
    df: float
    pvalue: float


class Results:
    r"""The rows of an evaluation run: one per sample × method × metric.

    ``table`` is a pandas DataFrame (pandas comes with the ``evaluate`` extra) with the
    columns ``index`` (position of the sample in the dataset), ``method``,
    ``metric``, ``value`` and ``seconds`` (see :func:`captum_faithful.evaluate` for
    what ``seconds`` measures). ``Results.load(out)`` reads a run back from its
    folder, also a run that is still going or was killed (then it holds the batches
    finished so far).

    Standard errors are :math:`s/\sqrt{n}` with the unbiased standard deviation
    :math:`s`; NaN metric values are left out of means, standard errors and tests
    (the ``n`` column says how many values were used).

    Examples::

        >>> results = Results.load("runs/exp1")
        >>> results.summary()
        >>> results.compare("uni", "ig", "insertion").pvalue
        >>> print(results.to_markdown())
    """

    def __init__(self, table: Any, settings: dict[str, Any] | None = None) -> None:
        """
        Args:
            table (pandas.DataFrame): A table with the columns above.
            settings (dict, optional): The run's recorded settings, if known.
                        Default: None
        """
        pd = optional_import("pandas", "evaluate")
        if not isinstance(table, pd.DataFrame):
            raise TypeError(
                f"`table` must be a pandas DataFrame, got {type(table).__name__}"
            )
        missing = [column for column in COLUMNS if column not in table.columns]
        if missing:
            raise ValueError(f"`table` lacks the columns {missing}; expected {COLUMNS}")
        self.table = table
        self.settings = settings

    @classmethod
    def load(cls, out: str | os.PathLike) -> Results:
        """The results recorded under ``out`` by :func:`captum_faithful.evaluate`.

        Raises ValueError naming a batch file that is truncated or does not belong
        to the run (see :mod:`captum_faithful.evaluation._storage`)."""
        storage = RunStorage(out)
        settings = storage.read_settings()
        if settings is None:
            raise FileNotFoundError(
                f"`out` ({Path(out)}) holds no evaluation run (no settings.json)"
            )
        return cls(storage.read_results(), settings)

    def _order(self, column: str) -> list[str]:
        key = {"method": "methods", "metric": "metrics"}[column]
        recorded = list((self.settings or {}).get("settings", {}).get(key, []))
        present = list(dict.fromkeys(self.table[column]))
        return [name for name in recorded if name in present] + [
            name for name in present if name not in recorded
        ]

    @property
    def methods(self) -> list[str]:
        """Method names in the order the run was given them."""
        return self._order("method")

    @property
    def metrics(self) -> list[str]:
        """Metric names in the order the run was given them."""
        return self._order("metric")

    def summary(self) -> Any:
        """Mean ± standard error per method × metric.

        Returns:
            pandas.DataFrame: indexed by (method, metric), columns ``n`` (non-NaN
            values), ``mean``, ``sem`` (standard error of the mean) and
            ``seconds`` (mean explanation time per sample of the method).
        """
        pd = optional_import("pandas", "evaluate")
        records = []
        for method in self.methods:
            for metric in self.metrics:
                rows = self.table[
                    (self.table["method"] == method) & (self.table["metric"] == metric)
                ]
                values = rows["value"].dropna()
                n = len(values)
                records.append(
                    {
                        "method": method,
                        "metric": metric,
                        "n": n,
                        "mean": float(values.mean()) if n else math.nan,
                        "sem": float(values.std(ddof=1) / math.sqrt(n))
                        if n > 1
                        else math.nan,
                        "seconds": float(rows["seconds"].mean())
                        if len(rows)
                        else math.nan,
                    }
                )
        frame = pd.DataFrame.from_records(
            records, columns=["method", "metric", "n", "mean", "sem", "seconds"]
        )
        return frame.set_index(["method", "metric"])

    def _values(self, method: str, metric: str) -> list[float]:
        for name, known in (("method", self.methods), ("metric", self.metrics)):
            value = method if name == "method" else metric
            if value not in known:
                raise ValueError(f"unknown {name} {value!r}; the run has {known}")
        rows = self.table[
            (self.table["method"] == method) & (self.table["metric"] == metric)
        ]
        return [float(v) for v in rows["value"] if not math.isnan(v)]

    def compare(self, a: str, b: str, metric: str) -> WelchTest:
        """Welch's t-test of method ``a`` against method ``b`` on ``metric``.

        The samples are the per-sample values of the two methods (NaN left out),
        treated as independent with possibly unequal variances:
        ``scipy.stats.ttest_ind(a, b, equal_var=False)`` (scipy comes with the
        ``evaluate`` extra), with the Welch-Satterthwaite degrees of freedom and a
        two-sided p-value. All three are NaN when a method has fewer than two
        values or both have zero variance.

        Returns:
            WelchTest: sizes, means, ``difference = mean_a - mean_b``, ``statistic``,
            ``df`` and ``pvalue``.
        """
        values_a = self._values(a, metric)
        values_b = self._values(b, metric)
        statistic, df, pvalue = welch_test(values_a, values_b)
        mean_a = math.fsum(values_a) / len(values_a) if values_a else math.nan
        mean_b = math.fsum(values_b) / len(values_b) if values_b else math.nan
        return WelchTest(
            metric=metric,
            a=a,
            b=b,
            n_a=len(values_a),
            n_b=len(values_b),
            mean_a=mean_a,
            mean_b=mean_b,
            difference=mean_a - mean_b,
            statistic=statistic,
            df=df,
            pvalue=pvalue,
        )

    def pairwise(self) -> Any:
        """Welch's t-test for every pair of methods on every metric.

        Returns:
            pandas.DataFrame: one row per (metric, a, b) with the fields of
            :class:`WelchTest`.
        """
        pd = optional_import("pandas", "evaluate")
        tests = [
            self.compare(a, b, metric)
            for metric in self.metrics
            for a, b in combinations(self.methods, 2)
        ]
        return pd.DataFrame(
            [test.__dict__ for test in tests],
            columns=list(WelchTest.__dataclass_fields__),
        )

    def to_markdown(self, digits: int = 4) -> str:
        """A Markdown report: mean ± standard error per method and metric, the time
        per sample, and (with two methods or more) the pairwise Welch tests.

        Args:
            digits (int, optional): Decimal places of the numbers.
                        Default: 4
        """
        digits = check_int("digits", digits, minimum=0)
        summary = self.summary()
        n_samples = self.table["index"].nunique()

        def number(value: float) -> str:
            return "nan" if math.isnan(value) else f"{value:.{digits}f}"

        lines = [
            f"{n_samples} samples; mean ± standard error; s/sample = explanation "
            "time per sample.",
            "",
        ]
        rows = []
        for method in self.methods:
            cells = [method]
            for metric in self.metrics:
                row = summary.loc[(method, metric)]
                cells.append(f"{number(row['mean'])} ± {number(row['sem'])}")
            cells.append(f"{summary.loc[(method, self.metrics[0])]['seconds']:.4g}")
            rows.append(cells)
        lines.append(markdown_table(["method", *self.metrics, "s/sample"], rows))
        if len(self.methods) > 1:
            lines += [
                "",
                "Welch's t-test (two-sided), a against b:",
                "",
                markdown_table(
                    ["metric", "a", "b", "mean a − b", "t", "df", "p"],
                    (
                        [
                            test.metric,
                            test.a,
                            test.b,
                            number(test.difference),
                            number(test.statistic),
                            "nan" if math.isnan(test.df) else f"{test.df:.1f}",
                            "nan" if math.isnan(test.pvalue) else f"{test.pvalue:.3g}",
                        ]
                        for test in self.pairwise().itertuples(index=False)
                    ),
                    text_columns=3,
                ),
            ]
        return "\n".join(lines) + "\n"

    def __repr__(self) -> str:
        return (
            f"Results({self.table['index'].nunique()} samples, "
            f"methods={self.methods}, metrics={self.metrics})"
        )


def welch_test(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """(t statistic, degrees of freedom, two-sided p-value) of Welch's test of
    ``a`` against ``b``; NaN for all three when it is undefined (see
    :meth:`Results.compare`)."""
    if len(a) < 2 or len(b) < 2 or (min(a) == max(a) and min(b) == max(b)):
        return math.nan, math.nan, math.nan
    stats = optional_import("scipy.stats", "evaluate")
    if min(a) == max(a) or min(b) == max(b):
        # One sample is constant: its variance is exactly zero, but ttest_ind
        # would subtract its mean and warn of "catastrophic cancellation". The
        # same test from the summary statistics, with that variance set to 0.
        (mean_a, std_a), (mean_b, std_b) = (
            (sample[0], 0.0)
            if min(sample) == max(sample)
            else (statistics.fmean(sample), statistics.stdev(sample))
            for sample in (a, b)
        )
        result = stats.ttest_ind_from_stats(
            mean_a, std_a, len(a), mean_b, std_b, len(b), equal_var=False
        )
        df = (std_a**2 / len(a) + std_b**2 / len(b)) ** 2 / (
            (std_a**2 / len(a)) ** 2 / (len(a) - 1)
            + (std_b**2 / len(b)) ** 2 / (len(b) - 1)
        )
        return float(result.statistic), float(df), float(result.pvalue)
    result = stats.ttest_ind(a, b, equal_var=False)
    return float(result.statistic), float(result.df), float(result.pvalue)
