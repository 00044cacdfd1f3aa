"""Faithfulness metrics, mirroring ``captum.metrics``."""

from captum_faithful.metrics._core.path_monotonicity import path_monotonicity

__all__: list[str] = ["path_monotonicity"]
