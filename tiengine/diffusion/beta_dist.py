"""Quantiles of the Beta(a, b) distribution in float64, for the "Beta" sigma schedule without scipy.

A1111's Beta schedule (after Lee et al. 2024, "Beta Sampling is All You Need", arXiv:2407.12173) places
its steps at ``scipy.stats.beta.ppf``. Here the regularized incomplete beta function I_x(a, b) is
evaluated with its continued fraction (DLMF 8.17.22, modified Lentz algorithm, as in Numerical Recipes'
``betacf``) and inverted by bisection on [0, 1] down to adjacent doubles, so the quantile is exact to
about 1e-15 (a test compares it with scipy).
"""

from __future__ import annotations

import math

from tiengine.diffusion.names import SamplingError

_TINY = 1e-300  # keeps Lentz's denominators away from 0
_CF_TOLERANCE = 1e-16
_CF_MAX_TERMS = 10_000


def _continued_fraction(x: float, a: float, b: float) -> float:
    """The continued fraction of I_x(a, b) (converges fast for x < (a + 1) / (a + b + 2))."""
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    value = d
    for m in range(1, _CF_MAX_TERMS):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + numerator / c
            c = c if abs(c) > _TINY else _TINY
            value *= d * c
        if abs(d * c - 1.0) < _CF_TOLERANCE:
            break
    return value


def regularized_incomplete_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b), the Beta(a, b) distribution function at x."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = a * math.log(x) + b * math.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _continued_fraction(x, a, b) / a
    return 1.0 - math.exp(log_front) * _continued_fraction(1.0 - x, b, a) / b


def beta_ppf(q: float, a: float, b: float) -> float:
    """The q-quantile of Beta(a, b): the x in [0, 1] with I_x(a, b) = q."""
    if not (a > 0 and b > 0):
        raise SamplingError(f"Beta schedule: expected a > 0 and b > 0, found a={a}, b={b}")
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    low, high = 0.0, 1.0
    while True:
        middle = 0.5 * (low + high)
        if middle in (low, high):  # adjacent doubles
            return middle
        if regularized_incomplete_beta(middle, a, b) < q:
            low = middle
        else:
            high = middle
