"""What recipes report while they run: one small logger protocol, with nothing to install.

Recipes call these three methods and never import a tracking library; `flows.tracking` has the
MLflow implementation, and a notebook can pass its own object (or nothing).
"""

from collections.abc import Mapping
from typing import Protocol


class MetricLogger(Protocol):
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Numeric values at an optimizer step."""

    def log_params(self, params: Mapping[str, object]) -> None:
        """Facts about the run that do not change during it (world size, effective batch)."""

    def log_text(self, text: str, name: str) -> None:
        """A text artifact, replaced whole on every call (sample generations)."""
