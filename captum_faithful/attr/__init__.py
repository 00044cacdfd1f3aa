"""Attribution methods, mirroring ``captum.attr``."""

__all__: list[str] = []
