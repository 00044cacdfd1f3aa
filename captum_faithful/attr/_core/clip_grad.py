"""ClipGrad: selective gradient clipping on layer outputs (the FEI paper's constraint).

A small context manager in the zennit style: it installs forward hooks on the
selected layers on ``__enter__`` and removes them on ``__exit__``, also when the
body raises. Inside, the clean activations ``h`` are captured once
(:meth:`ClipGrad.capture`); every later forward that builds a graph registers a
tensor hook on the layer output ``h~`` that zeroes the entries of the incoming
gradient ``g = d loss / d h~`` named by the rule, with ``d = h~ - h``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from captum_faithful._layers import Place, as_places
from captum_faithful._utils import check_choice, check_int

CLIP_RULES = ("vm", "ivm", "avm", "ibm", "none")


def clip_mask(rule: str, grad: Tensor, deviation: Tensor, clean: Tensor) -> Tensor:
    r"""The gradient entries a ClipGrad rule zeroes (a boolean tensor).

    With ``g`` the gradient of the loss with respect to the perturbed activation
    :math:`\tilde h`, :math:`d = \tilde h - h` (``deviation``) and :math:`h` the clean
    activation (``clean``), a gradient-descent step moves :math:`\tilde h` by
    :math:`-\eta g`. The rules zero ``g`` where that step would:

    - ``"vm"``: move :math:`\tilde h` away from :math:`h`,
      :math:`g d < 0` or :math:`d = 0`;
    - ``"ivm"``: amplify, :math:`g < 0` and :math:`d \ge 0`;
    - ``"avm"``: suppress, :math:`g > 0` and :math:`d \le 0`;
    - ``"ibm"``: activate a unit that is inactive on the
      clean input, :math:`h \le 0` and :math:`g < 0`;
    - ``"none"``: nothing.

    Only the signs of ``deviation`` and ``clean`` matter, so they may be passed as
    sign tensors.
    """
    check_choice("rule", rule, CLIP_RULES)
    if rule == "vm":
        return (grad * deviation < 0) | (deviation == 0)
    if rule == "ivm":
        return (grad < 0) & (deviation >= 0)
    if rule == "avm":
        return (grad > 0) & (deviation <= 0)
    if rule == "ibm":
        return (clean <= 0) & (grad < 0)
    return torch.zeros_like(grad, dtype=torch.bool)


def _check_index(index: Any) -> None:
    """``index`` of :meth:`ClipGrad.capture`: a 1-D tensor of row numbers >= 0
    (the upper bound is known after the forward)."""
    if not isinstance(index, Tensor):
        raise TypeError(
            "`index` must be a 1-D integer tensor of clean row numbers, got a "
            f"{type(index).__name__}; pass torch.tensor(...)"
        )
    if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise TypeError(
            "`index` must be a 1-D integer tensor of clean row numbers, got dtype "
            f"{str(index.dtype).removeprefix('torch.')}; pass index.long()"
        )
    if index.dim() != 1:
        raise ValueError(
            "`index` must be a 1-D integer tensor of clean row numbers, got shape "
            f"{tuple(index.shape)}"
        )
    if index.numel() and int(index.min()) < 0:
        raise ValueError(
            f"`index` must hold clean row numbers >= 0, got {int(index.min())}"
        )


def _lower_bound(applies_not: Tensor) -> Tensor:
    """In place: 1 -> the dtype's most negative finite number, 0 -> 0 (a lower bound
    that does not bind where ``applies_not`` is 1, and clamps to 0 elsewhere)."""
    return applies_not.mul_(-torch.finfo(applies_not.dtype).max)


def _upper_bound(applies_not: Tensor) -> Tensor:
    """In place: 1 -> the dtype's largest finite number, 0 -> 0."""
    return applies_not.mul_(torch.finfo(applies_not.dtype).max)


class ClipGrad:
    r"""Zero the gradient entries that would move layer outputs off their clean values.

    Used by :class:`FaithfulnessEnsemble` for its insertion game; usable on its own
    for any optimisation of a model's input. On entry, forward hooks are installed on
    ``layers``; :meth:`capture` records the clean activations :math:`h`; afterwards,
    for every forward that builds a graph, the gradient arriving at each layer output
    :math:`\tilde h` has the entries named by ``rule`` set to zero (see
    :func:`clip_mask`). Because the hooks sit on the layer outputs, the clipped
    gradient is what flows on to earlier layers and to the input.

    Rows: the clean activations (optionally re-indexed by ``index``, or each paired
    with ``repeats`` consecutive rows) cover the first ``n`` rows of a perturbed
    batch; later rows (e.g. FEI's deletion game) pass unclipped. A layer called
    several times per forward is paired call by call.
    Between forward and backward each rule keeps one tensor of the layer's size and
    dtype, taken in the forward hook (before an in-place activation can overwrite the
    output): :math:`\mathrm{sign}(d)` for ``"vm"``; for the one-sided rules the bound
    that the gradient is clamped to, 0 where the rule may zero an entry and the
    dtype's largest finite number elsewhere (with the sign that binds no finite
    gradient; an infinite gradient entry there comes back as that number), so that
    the backward is a single ``clamp``: for ``"ibm"`` that bound depends on the clean
    activation only and is taken once, at capture. The tensor is written into a
    buffer per layer call that comes back when the graph holding it is freed, so an
    optimisation loop allocates no new layer-sized tensor for it after the first
    iteration.

    Examples::

        >>> with ClipGrad([model.conv1, model.conv2], rule="vm") as clip:
        >>>     clip.capture(lambda: model(x))
        >>>     loss = -model(x_perturbed.requires_grad_()).softmax(1)[:, 3].sum()
        >>>     loss.backward()   # gradients clipped at conv1 and conv2
    """

    def __init__(
        self,
        layers: nn.Module | Place | Sequence[nn.Module | Place],
        rule: str = "vm",
    ) -> None:
        """
        Args:

            layers (nn.Module, Place or Sequence[nn.Module or Place]): the modules
                        whose outputs are constrained (e.g. from
                        ``captum_faithful._layers.select_layers``), or places: a module
                        and the tensor of its output to constrain, e.g. a Vision
                        Transformer's attention probabilities (from
                        ``captum_faithful._layers.select_places``). One module (or
                        place) alone is one layer, as in Captum: an ``nn.Sequential``
                        passed alone is constrained at its output, not at its children.
            rule (str, optional): ``"vm"``, ``"ivm"``, ``"avm"``, ``"ibm"`` or
                        ``"none"`` (hooks installed, nothing zeroed).
                        Default: ``"vm"``
        """
        check_choice("rule", rule, CLIP_RULES)
        if isinstance(layers, (nn.Module, Place)):
            layers = [layers]
        if not isinstance(layers, Sequence) or isinstance(layers, str):
            raise TypeError(
                "`layers` must be an nn.Module, a Place, or a non-empty sequence of "
                f"them, got {type(layers).__name__}"
            )
        layers = list(layers)
        if not layers or not all(isinstance(m, (nn.Module, Place)) for m in layers):
            raise TypeError(
                "`layers` must be an nn.Module, a Place, or a non-empty sequence of "
                f"them, got {layers!r}"
            )
        self.places = as_places(layers)
        self.layers = [place.module for place in self.places]
        self.rule = rule
        self.clean: list[list[Tensor]] = [[] for _ in layers]
        self._ibm_bounds: list[list[Tensor]] = [[] for _ in layers]
        self._calls = [0] * len(layers)
        self._repeats = 1
        # per (layer, call): the state buffer of a finished backward, reused by the
        # next forward (an optimisation allocates no new layer-sized tensor for it)
        self._spare: dict[tuple[int, int], Tensor] = {}
        self._capturing = False
        self._handles: list[Any] = []

    def __enter__(self) -> ClipGrad:
        try:
            for position, place in enumerate(self.places):
                self._handles.append(
                    place.module.register_forward_hook(self._make_hook(position))
                )
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clean = [[] for _ in self.layers]
        self._ibm_bounds = [[] for _ in self.layers]
        self._spare = {}
        self._capturing = False

    def capture(
        self,
        forward: Callable[[], Any],
        index: Tensor | None = None,
        repeats: int = 1,
    ) -> Any:
        """Run ``forward()`` without gradients, keep the layer outputs as ``h``.

        Args:

            forward (Callable): runs the model on the clean inputs.
            index (Tensor, optional): row ``r`` of later perturbed batches is
                        compared with clean row ``index[r]``: a 1-D integer tensor
                        of clean row numbers (0 <= ``index[r]`` < the clean batch
                        size); ``None`` pairs row ``r`` with row ``r``. The clean
                        activations are re-indexed once, here, so they take one row
                        per indexed row.
                        Default: None
            repeats (int, optional): row ``r`` of later perturbed batches is
                        compared with clean row ``r // repeats`` (e.g. FEI's K
                        maps per sample). Unlike the equivalent ``index``, the
                        clean activations are kept once and broadcast, so they
                        take ``repeats`` times less memory and memory traffic.
                        Not together with ``index``.
                        Default: 1

        Returns:
            What ``forward()`` returns.
        """
        if not self._handles:
            raise RuntimeError("ClipGrad.capture() must be called inside `with`")
        repeats = check_int("repeats", repeats, minimum=1)
        if index is not None and repeats != 1:
            raise ValueError("`index` and `repeats` cannot be used together")
        if index is not None:
            _check_index(index)
        self._repeats = repeats
        self.clean = [[] for _ in self.layers]
        self._capturing = True
        try:
            with torch.no_grad():
                result = forward()
        finally:
            self._capturing = False
        missing = [
            type(m).__name__
            for m, c in zip(self.layers, self.clean, strict=True)
            if not c
        ]
        if missing:
            self.clean = [[] for _ in self.layers]
            raise ValueError(
                f"`layers`: {missing} were not called by the forward, so ClipGrad "
                "has no clean activation for them"
            )
        if index is not None:
            rows = min(h.shape[0] for calls in self.clean for h in calls)
            if index.numel() and int(index.max()) >= rows:
                self.clean = [[] for _ in self.layers]
                raise ValueError(
                    f"`index` names clean row {int(index.max())}, but the forward "
                    f"gave {rows} clean rows; pass row numbers below {rows}"
                )
            # re-indexed once here rather than at every later forward
            self.clean = [
                [h.index_select(0, index.to(h.device)) for h in calls]
                for calls in self.clean
            ]
        # ibm reads only the clean activation: its clamp bound, taken once
        self._ibm_bounds = [
            [_lower_bound(torch.gt(h, 0, out=torch.empty_like(h))) for h in calls]
            for calls in self.clean
        ]
        self._calls = [0] * len(self.layers)
        self._spare = {}
        return result

    def _make_hook(self, position: int) -> Callable:
        select = self.places[position].select

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            output = select(module, output)
            if self._capturing:
                # a copy: an in-place activation may overwrite `output` next
                self.clean[position].append(output.detach().clone())
                return
            if self.rule == "none" or not output.requires_grad:
                return
            calls = self.clean[position]
            if not calls:
                raise RuntimeError("ClipGrad: call capture() before the optimisation")
            call = self._calls[position] % len(calls)
            h = calls[call]
            self._calls[position] += 1
            repeats = self._repeats
            n = h.shape[0] * repeats
            if output.shape[0] < n or output.shape[1:] != h.shape[1:]:
                raise ValueError(
                    f"ClipGrad: {type(module).__name__} output of shape "
                    f"{tuple(output.shape)} does not match the clean activation "
                    f"{tuple(h.shape)}"
                )
            # What each rule needs of d and h, taken now (before an in-place
            # activation can overwrite the output), in as few passes as possible,
            # into the buffer the last backward of this call handed back.
            head = output.detach()[:n]
            if self.rule == "ibm":
                state = self._ibm_bounds[position][call]
                output.register_hook(self._make_grad_hook(n, state, repeats))
                return
            slot = (position, call)
            spare = self._spare.pop(slot, None)
            if (
                spare is None
                or spare.shape != head.shape
                or spare.dtype != head.dtype
                or spare.device != head.device
            ):
                spare = torch.empty_like(head)
            state = spare
            # comparisons written as 0 / 1 in the activation dtype and scaled
            # (arithmetic passes: far cheaper on CPU than boolean masks)
            perturbed, into = head, state
            if repeats > 1:  # (n / repeats, repeats, ...) against h broadcast
                perturbed = head.unflatten(0, (h.shape[0], repeats))
                into = state.unflatten(0, (h.shape[0], repeats))
                h = h.unsqueeze(1)
            if self.rule == "vm":
                torch.sub(perturbed, h, out=into).sign_()
            elif self.rule == "ivm":  # zero g < 0 where d >= 0: g >= bound
                _lower_bound(torch.lt(perturbed, h, out=into))
            else:  # avm, zero g > 0 where d <= 0: g <= bound
                _upper_bound(torch.gt(perturbed, h, out=into))
            grad_hook = self._make_grad_hook(n, state)
            output.register_hook(grad_hook)
            # The buffer goes back to this call's slot when the graph that holds the
            # hook is freed (after its backward, or dropped unused), never while a
            # backward could still read it (e.g. ``retain_graph=True``).
            handback = weakref.finalize(grad_hook, self._spare.__setitem__, slot, state)
            handback.atexit = False

        return hook

    def _make_grad_hook(self, n: int, state: Tensor, repeats: int = 1) -> Callable:
        """The backward of one layer call; ``state`` has ``n`` rows, or, with
        ``repeats`` > 1 (ibm's bound only), ``n / repeats`` rows broadcast over the
        repeats."""
        rule = self.rule

        def grad_hook(grad: Tensor) -> Tensor:
            head = grad[:n]
            if repeats > 1:  # ibm's bound, one row per clean row
                head = torch.clamp(
                    head.unflatten(0, (state.shape[0], repeats)),
                    min=state.unsqueeze(1),
                ).flatten(0, 1)
            elif rule == "vm":
                # state = sign(d): max(g s, 0) s is g where g d > 0 and 0 where
                # g d < 0 or d = 0 (one buffer, no boolean mask)
                head = (head * state).clamp_(min=0).mul_(state)
            elif rule == "avm":  # state: 0 where d <= 0, else the largest number
                head = torch.clamp(head, max=state)
            else:  # ivm, ibm: state is 0 where the rule applies, else -largest
                head = torch.clamp(head, min=state)
            if grad.shape[0] == n:
                return head
            return torch.cat([head, grad[n:]])

        return grad_hook
