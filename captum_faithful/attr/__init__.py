"""Attribution methods, mirroring ``captum.attr``."""

from captum_faithful.attr._core.transmm import TransMM

__all__: list[str] = ["TransMM"]
