"""Faithfulness metrics, mirroring ``captum.metrics``."""

__all__: list[str] = []
