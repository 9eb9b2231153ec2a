"""Compare VAEs on images: round trips, metrics with confidence intervals, reports (terminal, JSON, CSV, HTML)."""

from vaekit.eval.compare import Comparison, Row, compare

__all__ = ["Comparison", "Row", "compare"]
