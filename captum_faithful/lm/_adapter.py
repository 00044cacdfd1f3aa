"""What a decoder-only language model looks like to activation and attribution
patching.

An :class:`LMAdapter` says which module returns the token embeddings (where a
baseline in embedding space enters the model), which modules are the transformer
blocks, how to run the model from token ids to logits, and where each named site
lives: a module and whether the site is the module's input or its output. Sites are
named like TransformerLens (``blocks.{l}.hook_resid_pre``,
``blocks.{l}.hook_resid_post``), so one name means the same place in every family.

Hooks on sites are installed by context managers that always remove them
(:func:`capture_sites`, :func:`replace_site_values`, :func:`replace_embeddings`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from captum_faithful._utils import as_logits, first_tensor

#: Site name of the residual stream before block ``l`` (the output of block l - 1).
RESID_PRE = "blocks.{}.hook_resid_pre"
#: Site name of the residual stream after block ``l``.
RESID_POST = "blocks.{}.hook_resid_post"


def _with_first(output: Any, value: Tensor) -> Any:
    """``output`` with its hidden states (see :func:`first_tensor`) replaced."""
    if isinstance(output, Tensor):
        return value
    return type(output)((value, *output[1:]))


@dataclass(frozen=True)
class Site:
    """One place in the model whose activation is read and patched.

    Attributes:
        name (str): The site's name, e.g. ``blocks.0.hook_resid_pre``.
        module (nn.Module): The module the activation enters or leaves.
        kind (str): ``"output"`` (the module's output, its first element for
            tuples) or ``"input"`` (the module's hidden-states argument: the
            keyword ``input_name`` when given so, else the first positional
            argument).
        input_name (str): The keyword of the hidden-states argument.
    """

    name: str
    module: nn.Module
    kind: str
    input_name: str = "hidden_states"


def hf_logits(model: nn.Module, input_ids: Tensor) -> Tensor:
    """Logits (N, T, V) of a Hugging Face causal LM, without a key-value cache."""
    return as_logits(model(input_ids=input_ids, use_cache=False))


def plain_logits(model: nn.Module, input_ids: Tensor) -> Tensor:
    """Logits (N, T, V) of a model called on the token ids (``model(input_ids)``)."""
    return as_logits(model(input_ids))


class LMAdapter:
    r"""Where the embeddings, blocks and residual streams live in one language model.

    Built-in adapters are found by :func:`~captum_faithful.lm.get_adapter`; for
    another family build one by hand and make it discoverable with
    :func:`~captum_faithful.lm.register_adapter`.

    The default sites are the residual stream before each block and after the last:
    ``blocks.{l}.hook_resid_pre`` for :math:`l < L` is the hidden-states input of
    block :math:`l` (for :math:`l \ge 1` the output of block :math:`l - 1`), and
    ``blocks.{L-1}.hook_resid_post`` is the output of the last block (before any
    final norm). Any other submodule of the model is a site too, by its name in
    ``model.named_modules()``: its output (the first element of a tuple output).
    """

    def __init__(
        self,
        model: nn.Module,
        embedding: nn.Module,
        blocks: Sequence[nn.Module],
        family: str = "custom",
        logits: Callable[[nn.Module, Tensor], Tensor] = plain_logits,
        residual_sites: dict[str, Site] | None = None,
    ) -> None:
        """
        Args:
            model (nn.Module): The model the adapter describes.
            embedding (nn.Module): The module whose output is the token embeddings
                        (N, T, d), before positional embeddings are added; a baseline
                        in embedding space replaces this output.
            blocks (Sequence[nn.Module]): The transformer blocks in forward order.
            family (str, optional): Human-readable name of the model family.
                        Default: ``"custom"``
            logits (Callable, optional): ``(model, input_ids) -> logits (N, T, V)``.
                        Default: :func:`plain_logits` (``model(input_ids)``, reduced to
                        its ``logits`` field)
            residual_sites (dict[str, Site], optional): The residual sites by name,
                        in forward order. Default: the inputs of the blocks and the
                        output of the last block, as above.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
        if not isinstance(embedding, nn.Module):
            raise TypeError(
                f"`embedding` must be an nn.Module, got {type(embedding).__name__}"
            )
        blocks = list(blocks)
        if not blocks or not all(isinstance(b, nn.Module) for b in blocks):
            raise ValueError("`blocks` must be a non-empty sequence of nn.Modules")
        if not callable(logits):
            raise TypeError("`logits` must be a callable (model, input_ids) -> logits")
        self.model = model
        self.embedding = embedding
        self.blocks = blocks
        self.family = family
        self._logits = logits
        if residual_sites is None:
            last = len(blocks) - 1
            residual_sites = {
                RESID_PRE.format(layer): Site(RESID_PRE.format(layer), block, "input")
                for layer, block in enumerate(blocks)
            }
            residual_sites[RESID_POST.format(last)] = Site(
                RESID_POST.format(last), blocks[last], "output"
            )
        self.residual_sites = dict(residual_sites)

    @property
    def num_layers(self) -> int:
        """Number of transformer blocks."""
        return len(self.blocks)

    @property
    def embedding_matrix(self) -> Tensor:
        """The token-embedding matrix (V, d): ``weight`` (``nn.Embedding``) or
        ``W_E`` (TransformerLens)."""
        for name in ("weight", "W_E"):
            matrix = getattr(self.embedding, name, None)
            if isinstance(matrix, Tensor) and matrix.dim() == 2:
                return matrix
        raise TypeError(
            f"the embedding module {type(self.embedding).__name__} has no 2-D "
            "`weight` or `W_E`; pass token-embedding baselines as a tensor"
        )

    @property
    def vocab_size(self) -> int:
        """Number of rows of the token-embedding matrix."""
        return self.embedding_matrix.shape[0]

    def logits(self, input_ids: Tensor) -> Tensor:
        """The model's logits (N, T, V) on ``input_ids`` (N, T)."""
        return self._logits(self.model, input_ids)

    def site_names(self) -> list[str]:
        """The default (residual) site names, in forward order."""
        return list(self.residual_sites)

    def site(self, name: str) -> Site:
        """The site called ``name``: a residual site, else a submodule's output.

        Raises ValueError listing the valid names for anything else.
        """
        if not isinstance(name, str):
            raise TypeError(f"site names must be strings, got {name!r}")
        if name in self.residual_sites:
            return self.residual_sites[name]
        modules = dict(self.model.named_modules())
        if name and name in modules:
            return Site(name, modules[name], "output")
        raise ValueError(
            f"`sites`: {name!r} is no site of this {self.family} model; valid names "
            f"are the residual sites {self.site_names()} or the name of any "
            "submodule in model.named_modules() (its output is the site)"
        )

    def __repr__(self) -> str:
        return (
            f"LMAdapter(family={self.family!r}, num_layers={self.num_layers}, "
            f"embedding={type(self.embedding).__name__})"
        )


def _hidden_states_argument(
    site: Site, args: tuple, kwargs: dict
) -> tuple[Tensor, Callable[[Tensor], tuple[tuple, dict]]]:
    """The hidden states a module is called with, and how to call it with others."""
    if site.input_name in kwargs:

        def put(value: Tensor) -> tuple[tuple, dict]:
            return args, {**kwargs, site.input_name: value}

        return kwargs[site.input_name], put
    if args and isinstance(args[0], Tensor):

        def put(value: Tensor) -> tuple[tuple, dict]:
            return (value, *args[1:]), kwargs

        return args[0], put
    raise TypeError(
        f"site {site.name!r}: {type(site.module).__name__} was called without a "
        f"tensor as first argument or as keyword {site.input_name!r}"
    )


@contextmanager
def transform_site(
    site: Site, transform: Callable[[Tensor], Tensor | None]
) -> Iterator:
    """Apply ``transform`` to the site's activation on every call; a non-None return
    replaces it. The hook is removed on exit, also when the forward raises."""
    if site.kind == "input":

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            value, put = _hidden_states_argument(site, args, kwargs)
            new = transform(value)
            return None if new is None else put(new)

        handle = site.module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:

        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            new = transform(first_tensor(output))
            return None if new is None else _with_first(output, new)

        handle = site.module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def check_first_run(name: str, seen: Mapping[str, Any]) -> None:
    """Raise RuntimeError if site ``name`` already ran in this forward pass (has an
    entry in ``seen``): patching needs each site to run once per call."""
    if name in seen:
        raise RuntimeError(
            f"site {name!r} ran twice in one forward pass; patching needs each site "
            "to run once per call"
        )


@contextmanager
def capture_sites(sites: Sequence[Site]) -> Iterator[dict[str, Tensor]]:
    """Record the activation of every site (with its graph) in a dict by name.

    A site that runs more than once per forward raises RuntimeError.
    """
    store: dict[str, Tensor] = {}

    def recorder(name: str) -> Callable[[Tensor], None]:
        def record(value: Tensor) -> None:
            check_first_run(name, store)
            store[name] = value

        return record

    with ExitStack() as stack:
        for site in sites:
            stack.enter_context(transform_site(site, recorder(site.name)))
        yield store


@contextmanager
def replace_site_values(
    sites: Sequence[Site], transforms: Sequence[Callable[[Tensor], Tensor]]
) -> Iterator[None]:
    """Replace each site's activation by ``transform(activation)``; hooks removed
    on exit."""
    with ExitStack() as stack:
        for site, transform in zip(sites, transforms, strict=True):
            stack.enter_context(transform_site(site, transform))
        yield


@contextmanager
def replace_embeddings(adapter: LMAdapter, embeddings: Tensor) -> Iterator[None]:
    """Make the embedding module return ``embeddings`` (N, T, d); positional
    embeddings, if the model has them, are still added by the model."""

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        current = first_tensor(output)
        if current.shape != embeddings.shape:
            raise RuntimeError(
                f"the embedding module returned shape {tuple(current.shape)}, the "
                f"baseline embeddings have shape {tuple(embeddings.shape)}"
            )
        # a copy, so that in-place operations downstream never hit the caller's
        return _with_first(output, embeddings.clone())

    handle = adapter.embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
