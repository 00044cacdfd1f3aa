"""Welch's unequal-variance t-test, with the p-value in closed form.

For samples a and b with means m, unbiased variances v and sizes n:

.. math::

    t = \\frac{m_a - m_b}{\\sqrt{v_a/n_a + v_b/n_b}}, \\qquad
    \\nu = \\frac{(v_a/n_a + v_b/n_b)^2}
                {\\frac{(v_a/n_a)^2}{n_a - 1} + \\frac{(v_b/n_b)^2}{n_b - 1}}

(Welch-Satterthwaite degrees of freedom). The two-sided p-value of Student's t
distribution with ν degrees of freedom is the regularized incomplete beta function

.. math::

    p = P(|T_\\nu| \\ge |t|) = I_{\\nu / (\\nu + t^2)}\\left(\\frac{\\nu}{2},
        \\frac{1}{2}\\right).

``scipy.special.betainc`` computes I when scipy is installed; otherwise
:func:`regularized_incomplete_beta` evaluates it with the continued fraction of
Numerical Recipes (Press et al., §6.4) by the modified Lentz method, accurate to
about 1e-14.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

_TINY = 1e-300
_EPS = 1e-15
_MAX_ITERATIONS = 10_000


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = 1.0
    d = 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, _MAX_ITERATIONS + 1):
        m2 = 2 * m
        for aa in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + aa / c
            c = c if abs(c) > _TINY else _TINY
            step = c * d
            h *= step
        if abs(step - 1.0) < _EPS:
            return h
    raise ArithmeticError(f"incomplete beta did not converge for a={a}, b={b}, x={x}")


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) for a, b > 0 and 0 <= x <= 1, without scipy."""
    if not (a > 0 and b > 0):
        raise ValueError(f"incomplete beta needs a > 0 and b > 0, got a={a}, b={b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"incomplete beta needs 0 <= x <= 1, got x={x}")
    if x == 0.0 or x == 1.0:
        return x
    log_front = (
        math.lgamma(a + b)
        - math.lgamma(a)
        - math.lgamma(b)
        + a * math.log(x)
        + b * math.log1p(-x)
    )
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_continued_fraction(a, b, x) / a
    return 1.0 - front * _beta_continued_fraction(b, a, 1.0 - x) / b


def _betainc(a: float, b: float, x: float) -> float:
    try:
        from scipy.special import betainc
    except ImportError:
        return regularized_incomplete_beta(a, b, x)
    return float(betainc(a, b, x))


def t_two_sided_pvalue(statistic: float, df: float) -> float:
    """P(|T| >= |statistic|) for Student's t with ``df`` degrees of freedom."""
    if math.isnan(statistic) or math.isnan(df):
        return math.nan
    if math.isinf(statistic):
        return 0.0
    return _betainc(df / 2.0, 0.5, df / (df + statistic * statistic))


def _mean_var(values: Sequence[float]) -> tuple[int, float, float]:
    n = len(values)
    mean = math.fsum(values) / n
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return n, mean, var


def welch(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """(t statistic, Welch-Satterthwaite df, two-sided p-value) of a against b.

    NaN for all three when a sample has fewer than two values or both samples have
    zero variance (the statistic is undefined).
    """
    if len(a) < 2 or len(b) < 2:
        return math.nan, math.nan, math.nan
    n_a, mean_a, var_a = _mean_var(a)
    n_b, mean_b, var_b = _mean_var(b)
    se_a, se_b = var_a / n_a, var_b / n_b
    if se_a + se_b == 0.0:
        return math.nan, math.nan, math.nan
    statistic = (mean_a - mean_b) / math.sqrt(se_a + se_b)
    df = (se_a + se_b) ** 2 / (se_a**2 / (n_a - 1) + se_b**2 / (n_b - 1))
    return statistic, df, t_two_sided_pvalue(statistic, df)
