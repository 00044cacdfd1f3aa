"""Faithfulness metrics, mirroring ``captum.metrics``."""

from captum_faithful.metrics._core.activation_deviation import activation_deviation

__all__: list[str] = [
    "activation_deviation",
]
