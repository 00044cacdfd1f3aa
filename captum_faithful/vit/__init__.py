"""Vision-Transformer adapters: where attention and residual streams live."""

__all__: list[str] = []
