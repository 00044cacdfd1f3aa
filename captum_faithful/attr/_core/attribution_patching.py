"""Attribution patching of a language model from a baseline in embedding space,
learned by UNI by default (UNI, Appendix A.2)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from captum.log import log_usage
from torch import Tensor, nn

from captum_faithful._arguments import (
    check_integration_arguments,
    check_model_output,
)
from captum_faithful._utils import (
    check_float,
    check_int,
    preserve_model_state,
)
from captum_faithful.attr._core.layer.layer_unlearned_integrated_gradients import (
    LayerUnlearnedIntegratedGradients,
)
from captum_faithful.attr._utils.patching import (
    Run,
    Score,
    TargetFunction,
    baseline_embeddings,
    check_baselines,
    check_logits,
    check_prompts,
    check_target,
    embedded_run,
    explained_tokens,
    resolve_sites,
)
from captum_faithful.attr._utils.unlearning import path_points
from captum_faithful.lm import get_adapter
from captum_faithful.lm._adapter import (
    LMAdapter,
    Site,
    check_first_run,
    replace_embeddings,
    replace_site_values,
)


class AttributionPatching:
    r"""
    Attribution patching estimates, for every site :math:`e` (a residual-stream
    activation at one layer and one token), how much the model's score :math:`F`
    on a baseline run :math:`x'` moves when that one activation is replaced by its
    value on the prompt :math:`x` — what activation patching
    (:func:`~captum_faithful.activation_patching`) measures exactly, with one
    forward per site — from one forward and one backward of the baseline run:

    .. math::
        A^{\mathrm{ATTR}}_e = (e(x) - e(x'))^\top \nabla_e F(x')

    The prompt is taken in embedding space, :math:`E(x)`, and the baseline
    :math:`x'` is a point there: by default UNI's learned baseline (Algorithm 1 on
    the token embeddings, unlearning the explained token at the last position),
    which the paper found to bring attribution patching much closer to activation
    patching than a random baseline. With ``n_steps`` :math:`= B > 1` the gradient
    is averaged along the straight path in embedding space (integrated-gradients
    patching), taken at every site, then multiplied by the site's difference:

    .. math::
        A_e = (e(x) - e(x'))^\top \sum_{k=1}^{B} w_k\,
        \nabla_e F\big(x' + \alpha_k (E(x) - x')\big)

    with Captum's points :math:`\alpha_k` and weights :math:`w_k` for ``method``.
    The default, left Riemann (:math:`\alpha_k = (k-1)/B`, :math:`w_k = 1/B`),
    makes ``n_steps=1`` exactly the first-order formula above (the gradient at
    :math:`x'`); ``riemann_right`` would take it at :math:`x` instead.

    :math:`F` is, by default, the logit at the last position of the token the model
    ranks first on :math:`x`. The gradient with respect to site :math:`e` is the
    derivative of :math:`F(x' \mid e \leftarrow e(x') + \delta)` at
    :math:`\delta = 0`, taken through a hook that adds :math:`\delta` where
    activation patching writes, so both methods intervene at the same place.
    Baselines replace the output of the token-embedding module (positional
    embeddings, if the model has them, are still added by the model). Prompts in
    one call share one length; there is no padding or attention mask. The model
    runs in the mode the user left it in (use ``model.eval()``: dropout would make
    the runs differ) and comes back unchanged (parameters, ``requires_grad``,
    mode, hooks, attention implementation).
    """

    def __init__(
        self,
        model: nn.Module,
        sites: str | list[str] = "residual",
        unlearning_step: float = 1.0,
        pgd_steps: int = 10,
        epsilon: float = 0.25,
        pgd_step_size: float = 0.1,
    ) -> None:
        r"""
        Args:

            model (nn.Module): A decoder-only language model of a family
                        :func:`captum_faithful.lm.get_adapter` knows (Hugging Face
                        GPT-2, GPT-NeoX / Pythia, Llama, TransformerLens
                        ``HookedTransformer``, or one made known with
                        :func:`captum_faithful.lm.register_adapter`).
            sites (str or list[str], optional): ``"residual"``: the residual stream
                        before each block and after the last,
                        ``blocks.{l}.hook_resid_pre`` for :math:`l < L` and
                        ``blocks.{L-1}.hook_resid_post`` (:math:`L + 1` sites). Or
                        site names: those, or any submodule name of the model (its
                        output; for a ``HookedTransformer`` every HookPoint, e.g.
                        ``blocks.0.hook_resid_mid``). Activations must be
                        (N, T, ...); their trailing dimensions are summed.
                        Default: ``"residual"``
            unlearning_step (float, optional): UNI's :math:`\eta` (> 0), the L2
                        length of the unlearning step on all parameters.
                        Default: 1.0
            pgd_steps (int, optional): UNI's :math:`T` (>= 0), the baseline
                        matching steps.
                        Default: 10
            epsilon (float, optional): UNI's :math:`\varepsilon` (> 0): the L2
                        distance between the learned baseline and :math:`E(x)`, one
                        radius over all tokens and embedding coordinates of a prompt.
                        0.25 is the value the paper used unchanged on its language
                        models (chosen for 3x224x224 images, not tuned for
                        language models), kept here so that results compare with
                        the paper's. Per coordinate it moves the embeddings by
                        :math:`\varepsilon / \sqrt{T d}` (root mean square), e.g.
                        0.0032 for 8 tokens of GPT-2 small (d = 768); compare it
                        with the spread of the embeddings (the standard deviation of
                        the embedding matrix). For a given size per coordinate,
                        scale :math:`\varepsilon` with :math:`\sqrt{T d}`.
                        Default: 0.25
            pgd_step_size (float, optional): UNI's :math:`\mu` (> 0).
                        Default: 0.1
        """
        self.adapter: LMAdapter = get_adapter(model)
        self.model = model
        self.sites: list[Site] = resolve_sites(self.adapter, sites)
        self.unlearning_step = check_float(
            "unlearning_step",
            unlearning_step,
            low=0.0,
            low_inclusive=False,
            finite=True,
        )
        self.pgd_steps = check_int("pgd_steps", pgd_steps, minimum=0)
        self.epsilon = check_float(
            "epsilon", epsilon, low=0.0, low_inclusive=False, finite=True
        )
        self.pgd_step_size = check_float(
            "pgd_step_size", pgd_step_size, low=0.0, low_inclusive=False, finite=True
        )

    @property
    def site_names(self) -> list[str]:
        """The names of the sites, in the order of the attributions' dim 1."""
        return [site.name for site in self.sites]

    @log_usage()
    def attribute(
        self,
        input_ids: Tensor,
        baselines: str | Tensor = "unlearned",
        target: int | Tensor | TargetFunction | None = None,
        n_steps: int = 1,
        method: str = "riemann_left",
        internal_batch_size: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        r"""
        Args:

            input_ids (Tensor): Token ids (N, T) of N prompts of one length T.
            baselines (str or Tensor, optional): The baseline :math:`x'`:
                        ``"unlearned"`` (UNI's learned baseline, see
                        :meth:`compute_baselines`), ``"random"`` (i.i.d. Gaussian
                        embeddings with the mean and standard deviation of all
                        entries of the token-embedding matrix), ``"zero"`` (zero
                        token embeddings), a LongTensor of corrupted prompts (N, T)
                        (their token embeddings), or embeddings (N, T, d) (e.g.
                        :meth:`compute_baselines`'s output).
                        Default: ``"unlearned"``
            target (int, Tensor, or Callable, optional): :math:`F`. None: the
                        logit at the last position of the token the model ranks
                        first there on ``input_ids``, per prompt. Token ids (an
                        int, or an integer tensor (N,)): their logit at the last
                        position. A callable ``target(logits, prompts)`` taking
                        logits (M, T, V) of M rows and the index (M,) in
                        ``input_ids`` of the prompt each row belongs to, returning
                        (M,), e.g. a logit difference between per-prompt tokens
                        ``good`` and ``bad``: ``lambda logits, prompts:
                        logits[:, -1].gather(1, good[prompts, None])[:, 0] -
                        logits[:, -1].gather(1, bad[prompts, None])[:, 0]``; a
                        callable of one argument, ``target(logits)``, is called
                        with the logits alone (right when F is the same function
                        for every prompt, e.g. the difference of two fixed
                        tokens). Rows must be scored independently. For the
                        unlearned baseline the unlearned class is the target
                        token (None or token ids) or the clean top token
                        (callable).
                        Default: None
            n_steps (int, optional): :math:`B`, points on the path in embedding
                        space (>= 1); 1 is plain attribution patching.
                        Default: 1
            method (str, optional): Captum's approximation method for the path
                        (``riemann_left``, ``riemann_right``, ``riemann_middle``,
                        ``riemann_trapezoid`` (``n_steps`` >= 2),
                        ``gausslegendre``).
                        Default: ``riemann_left``
            internal_batch_size (int, optional): Rows (path points x prompts)
                        per forward and backward; None runs all
                        ``n_steps * N`` at once.
                        Default: None
            generator (torch.Generator, optional): Random source of
                        ``baselines="random"``.
                        Default: None (the global generator)

        Returns:
            *Tensor* of shape (N, n_sites, T), :math:`A_e` per prompt, site (in the order
            of :attr:`site_names`) and token.

        Examples::

            >>> from transformers import AutoModelForCausalLM, AutoTokenizer
            >>> model = AutoModelForCausalLM.from_pretrained("EleutherAI/pythia-70m")
            >>> tokenizer = AutoTokenizer.from_pretrained("EleutherAI/pythia-70m")
            >>> ids = tokenizer(["The capital of France is"], return_tensors="pt")
            >>> patching = AttributionPatching(model)
            >>> scores = patching.attribute(ids.input_ids)  # (1, 7, T)
            >>> # the same baseline for exact activation patching
            >>> x_prime = patching.compute_baselines(ids.input_ids)
            >>> exact = activation_patching(model, ids.input_ids, x_prime)
        """
        n_steps, method, internal_batch_size = check_integration_arguments(
            n_steps, method, internal_batch_size
        )
        input_ids, checked_baselines, checked_target = self._check(
            input_ids, baselines, target, generator
        )
        with preserve_model_state(self.model):
            clean, baseline, score = self._prepare(
                input_ids, checked_baselines, checked_target, generator
            )
            base = embedded_run(self.adapter, input_ids, self.sites, baseline)
            gradients = self._path_gradients(
                input_ids,
                clean.embeddings,
                baseline,
                score,
                path_points(method, n_steps),
                internal_batch_size,
            )
        return torch.stack(
            [
                _sum_trailing(
                    (clean.activations[site.name] - base.activations[site.name])
                    * gradients[site.name]
                )
                for site in self.sites
            ],
            dim=1,
        )

    def compute_baselines(
        self,
        input_ids: Tensor,
        baselines: str | Tensor = "unlearned",
        target: int | Tensor | TargetFunction | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        r"""
        The baseline :math:`x'` in embedding space that :meth:`attribute` starts
        from, to reuse it (e.g. with :func:`~captum_faithful.activation_patching`
        on the same :math:`x'`) or to look at it.

        ``"unlearned"`` is UNI's Algorithm 1 on the token embeddings, through
        :class:`~captum_faithful.LayerUnlearnedIntegratedGradients` on the
        token-embedding module with the next-token logits at the last position as
        the class scores: the parameters take one step of L2 length
        ``unlearning_step`` up the loss of the explained token :math:`c` (the
        target token, or the clean top token),
        :math:`\hat p = \mathrm{softmax} f(x; \hat\theta)_{T}`, and

        .. math::
            \delta^{t+1} = \varepsilon \frac{\delta^t - \mu \nabla_\delta
            \mathrm{KL}(\hat p \,\Vert\, \mathrm{softmax} f(E(x) + \delta^t))_T}
            {\lVert \cdot \rVert_2}, \quad \delta^0 = 0, \qquad
            x' = E(x) + \delta^{T}

        Args:

            input_ids (Tensor): As in :meth:`attribute`.
            baselines (str or Tensor, optional): As in :meth:`attribute`.
                        Default: ``"unlearned"``
            target (int, Tensor, or Callable, optional): As in :meth:`attribute`.
                        Default: None
            generator (torch.Generator, optional): As in :meth:`attribute`.
                        Default: None

        Returns:
            *Tensor* of shape (N, T, d), the baseline token embeddings.

        Examples::

            >>> patching = AttributionPatching(model)
            >>> x_prime = patching.compute_baselines(input_ids)
            >>> (x_prime - model.get_input_embeddings()(input_ids)).norm(dim=(1, 2))
            tensor([0.2500])
        """
        input_ids, checked_baselines, checked_target = self._check(
            input_ids, baselines, target, generator
        )
        with preserve_model_state(self.model):
            baseline = self._prepare(
                input_ids, checked_baselines, checked_target, generator
            )[1]
        return baseline

    def _check(
        self, input_ids: Any, baselines: Any, target: Any, generator: Any
    ) -> tuple[Tensor, str | Tensor, Tensor | TargetFunction | None]:
        """Every argument in canonical form, before any model call."""
        input_ids = check_prompts(self.adapter, input_ids)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"`generator` must be a torch.Generator, got {type(generator).__name__}"
            )
        return (
            input_ids,
            check_baselines(self.adapter, baselines, input_ids, allow_unlearned=True),
            check_target(self.adapter, target, input_ids.shape[0]),
        )

    def _prepare(
        self,
        input_ids: Tensor,
        baselines: str | Tensor,
        target: Tensor | TargetFunction | None,
        generator: torch.Generator | None,
    ) -> tuple[Run, Tensor, Score]:
        """The clean run, the baseline embeddings and F."""
        clean = embedded_run(self.adapter, input_ids, self.sites)
        check_model_output(clean.logits, type(self).__name__)
        tokens = explained_tokens(target, clean)
        baseline = baseline_embeddings(
            self.adapter,
            baselines,
            input_ids,
            clean,
            generator,
            unlearned=lambda ids: self._unlearned(ids, tokens),
        )
        return clean, baseline, Score(tokens if not callable(target) else target)

    def _unlearned(self, input_ids: Tensor, tokens: Tensor) -> Tensor:
        """UNI's learned baseline of the token embeddings (package's Layer UNI)."""
        adapter = self.adapter

        def last_logits(ids: Tensor) -> Tensor:
            return adapter.logits(ids)[:, -1]

        uni = LayerUnlearnedIntegratedGradients(
            last_logits,
            adapter.embedding,
            model=self.model,
            unlearning_step=self.unlearning_step,
            pgd_steps=self.pgd_steps,
            epsilon=self.epsilon,
            pgd_step_size=self.pgd_step_size,
        )
        # one layer, whose output is one tensor
        return cast(Tensor, uni.compute_baselines(input_ids, target=tokens))

    def _path_gradients(
        self,
        input_ids: Tensor,
        embeddings: Tensor,
        baseline: Tensor,
        score: Score,
        points: tuple[list[float], list[float]],
        internal_batch_size: int | None,
    ) -> dict[str, Tensor]:
        r""":math:`\sum_k w_k \nabla_e F(x' + \alpha_k (E(x) - x'))` per site,
        (N, T, ...), from forwards of ``internal_batch_size`` rows."""
        weights, alphas = points
        n_prompts = input_ids.shape[0]
        steps = torch.arange(len(alphas)).repeat_interleave(n_prompts)
        prompts = torch.arange(n_prompts).repeat(len(alphas))
        rows_per_chunk = internal_batch_size or len(steps)
        totals: dict[str, Tensor] = {}
        for start in range(0, len(steps), rows_per_chunk):
            chunk_steps = steps[start : start + rows_per_chunk]
            chunk_prompts = prompts[start : start + rows_per_chunk]
            alpha = torch.tensor(
                [alphas[k] for k in chunk_steps.tolist()],
                dtype=embeddings.dtype,
                device=embeddings.device,
            ).view(-1, 1, 1)
            on_path = baseline[chunk_prompts] + alpha * (
                embeddings[chunk_prompts] - baseline[chunk_prompts]
            )
            grads = self._site_gradients(
                input_ids[chunk_prompts], on_path, score, chunk_prompts
            )
            for name, grad in grads.items():
                weight = torch.tensor(
                    [weights[k] for k in chunk_steps.tolist()],
                    dtype=grad.dtype,
                    device=grad.device,
                ).view(-1, *([1] * (grad.dim() - 1)))
                total = totals.setdefault(
                    name, grad.new_zeros((n_prompts, *grad.shape[1:]))
                )
                total.index_add_(0, chunk_prompts.to(grad.device), weight * grad)
        return totals

    def _site_gradients(
        self, input_ids: Tensor, embeddings: Tensor, score: Score, prompts: Tensor
    ) -> dict[str, Tensor]:
        r""":math:`\partial F / \partial \delta_e` at :math:`\delta = 0` for every
        site, where the hook makes site :math:`e` return :math:`e + \delta_e`."""
        deltas: dict[str, Tensor] = {}

        def perturb(name: str) -> Callable[[Tensor], Tensor]:
            def add_delta(value: Tensor) -> Tensor:
                check_first_run(name, deltas)
                deltas[name] = torch.zeros_like(value, requires_grad=True)
                return value + deltas[name]

            return add_delta

        with (
            torch.enable_grad(),
            replace_embeddings(self.adapter, embeddings),
            replace_site_values(
                self.sites, [perturb(site.name) for site in self.sites]
            ),
        ):
            logits = self.adapter.logits(input_ids)
            check_logits(logits, *input_ids.shape)
            scores = score(logits, prompts.to(logits.device))
            names = list(deltas)
            grads = torch.autograd.grad(
                scores.sum(), [deltas[n] for n in names], allow_unused=True
            )
        return {
            name: torch.zeros_like(deltas[name]) if grad is None else grad.detach()
            for name, grad in zip(names, grads, strict=True)
        }


def _sum_trailing(values: Tensor) -> Tensor:
    """Sum over the dimensions after (N, T): one value per prompt and token."""
    return values.reshape(*values.shape[:2], -1).sum(dim=2)
