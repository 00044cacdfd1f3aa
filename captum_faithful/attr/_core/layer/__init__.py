"""Layer attribution methods, mirroring ``captum.attr._core.layer``."""
