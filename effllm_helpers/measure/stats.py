"""Repeated measurements -> mean, std and a 95% confidence interval of the mean.

Why our own Student-t quantile: scipy is not a dependency, and a CI from the normal 1.96 would be
far too narrow for the 2-5 repeats a GPU budget allows (t_{0.975,2} = 4.30). The quantile comes
from the regularised incomplete beta function (continued fraction) inverted by bisection.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) for 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    ln_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                + a * math.log(x) + b * math.log1p(-x))
    front = math.exp(ln_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """CDF of Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_ppf(p: float, df: float) -> float:
    """Quantile of Student's t (bisection on the CDF; |error| < 1e-10)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie in (0, 1), got {p}")
    if p < 0.5:
        return -t_ppf(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return 0.5 * (lo + hi)


def summarize(values: Iterable[float | int | None]) -> dict[str, Any]:
    """Mean, sample std (n-1), n and the 95% CI half-width t_{0.975,n-1}·s/√n of the mean.

    ``None`` and non-finite entries (failed repeats) are dropped and counted in ``n_dropped``.
    With n = 1 the std and CI are undefined: they are None and ``ci95_reason`` says why.
    """
    raw = list(values)
    vals = [float(v) for v in raw if v is not None and math.isfinite(float(v))]
    n = len(vals)
    out: dict[str, Any] = {"mean": None, "std": None, "n": n, "ci95": None,
                           "n_dropped": len(raw) - n}
    if n == 0:
        out["ci95_reason"] = "no finite values"
        return out
    mean = math.fsum(vals) / n
    out["mean"] = mean
    if n == 1:
        out["ci95_reason"] = "n=1: one repeat gives no spread (std and CI undefined)"
        return out
    var = math.fsum((v - mean) ** 2 for v in vals) / (n - 1)
    std = math.sqrt(var)
    out["std"] = std
    out["ci95"] = t_ppf(0.975, n - 1) * std / math.sqrt(n)
    return out
