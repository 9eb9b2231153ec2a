"""Means with confidence intervals, and winners called only when a paired test on the same images says so.

Interval: Student's t-interval of the mean, mean +- t(0.975, n-1) * sd / sqrt(n) (95 %), over the per-image values.

Winner: the rows are measured on the same images, so differences are tested pairwise per image, which removes
the image-to-image spread that dominates the intervals. The row with the best mean is called the winner of a metric
only when a one-sided paired t-test on the per-image differences rejects "no better" against EVERY other row at
the 5 % level. Requiring every comparison to pass is an intersection-union test, so no multiple-comparison
correction is needed for the claim "better than all the others". With fewer than two images, or when any
comparison fails, the answer is "no clear winner".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from scipy import stats

from vaekit.eval.metrics import MetricInfo

CONFIDENCE = 0.95
ALPHA = 0.05


@dataclass(frozen=True)
class Summary:
    """Mean of the per-image values with its 95 % t-interval (low, high are nan with fewer than two values)."""

    mean: float
    low: float
    high: float
    n: int

    def to_dict(self) -> dict[str, float | int | None]:
        """Plain dict; nan becomes None (JSON has no nan)."""
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Winner:
    """The outcome of a metric: the winning row's label, or None with the reason no winner is called."""

    metric: str
    label: str | None
    reason: str
    p_value: float = math.nan

    def to_dict(self) -> dict[str, str | float | None]:
        """Plain dict for JSON."""
        return {
            "metric": self.metric,
            "winner": self.label,
            "reason": self.reason,
            "p_value": self.p_value if math.isfinite(self.p_value) else None,
        }


def finite(values: Sequence[float]) -> list[float]:
    """The finite values of a sequence (nan marks a value that could not be measured)."""
    return [v for v in values if math.isfinite(v)]


def mean_ci(values: Sequence[float], confidence: float = CONFIDENCE) -> Summary:
    """Mean and t-interval of the finite values."""
    xs = finite(values)
    n = len(xs)
    if n == 0:
        return Summary(math.nan, math.nan, math.nan, 0)
    mean = math.fsum(xs) / n
    if n < 2:
        return Summary(mean, math.nan, math.nan, n)
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return Summary(mean, mean - half, mean + half, n)


def paired_p_value(worse: Sequence[float], better: Sequence[float]) -> float:
    """One-sided paired t-test p-value that ``better`` has lower values than ``worse`` (pairs with nan dropped)."""
    diffs = [w - b for w, b in zip(worse, better, strict=True) if math.isfinite(w) and math.isfinite(b)]
    n = len(diffs)
    if n < 2:
        return math.nan
    mean = math.fsum(diffs) / n
    sd = math.sqrt(math.fsum((d - mean) ** 2 for d in diffs) / (n - 1))
    if sd == 0.0:  # every image differs by the same amount: certain if that amount is positive, else no evidence
        return 0.0 if mean > 0 else 1.0
    t = mean / (sd / math.sqrt(n))
    return float(stats.t.sf(t, n - 1))


def call_winner(metric: MetricInfo, values: Mapping[str, Sequence[float]], alpha: float = ALPHA) -> Winner:
    """The row that beats every other row on ``metric`` by a paired test, or no winner with the reason."""
    if len(values) < 2:
        return Winner(metric.key, None, "only one row to compare")
    losses = {label: [metric.loss(v) if math.isfinite(v) else math.nan for v in vs] for label, vs in values.items()}
    means = {label: mean_ci(ls).mean for label, ls in losses.items()}
    measured = {label: m for label, m in means.items() if math.isfinite(m)}
    if len(measured) < 2:
        return Winner(metric.key, None, "fewer than two rows were measured")
    best = min(measured, key=lambda label: measured[label])
    worst_p = 0.0
    for label in measured:
        if label == best:
            continue
        p = paired_p_value(losses[label], losses[best])
        if not math.isfinite(p):
            return Winner(metric.key, None, "no clear winner: fewer than two images measured by both rows")
        if p >= alpha:
            return Winner(
                metric.key, None, f"no clear winner: {best} vs {label} not significant (paired t-test p = {p:.2g})", p
            )
        worst_p = max(worst_p, p)
    return Winner(metric.key, best, f"better than every other row (paired t-test, largest p = {worst_p:.2g})", worst_p)
