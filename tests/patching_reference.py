"""Activation and attribution patching written from the definitions, without the
package: one forward per (prompt, site, token) or per site, with hooks written
here, and a model that is linear in its residual stream.

Sites are placed independently of the package's adapters: in a Hugging Face model
``blocks.{l}.hook_resid_pre`` is the first argument of block 0 (l = 0) or the
output of block l - 1 (l >= 1), ``blocks.{L-1}.hook_resid_post`` the output of the
last block; in a HookedTransformer each is the HookPoint of that name, reached
through TransformerLens's own ``run_with_hooks``.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch
import torch.nn.functional as F
from torch import nn

#: Hugging Face families: (token-embedding module path, blocks path).
HF_PATHS = {
    "gpt2": ("transformer.wte", "transformer.h"),
    "gpt_neox": ("gpt_neox.embed_in", "gpt_neox.layers"),
    "llama": ("model.embed_tokens", "model.layers"),
}


def is_hooked(model) -> bool:
    return type(model).__name__ == "HookedTransformer"


def site_names(n_layers: int) -> list[str]:
    return [f"blocks.{layer}.hook_resid_pre" for layer in range(n_layers)] + [
        f"blocks.{n_layers - 1}.hook_resid_post"
    ]


def embedding_module(model, family: str) -> nn.Module:
    if is_hooked(model):
        return model.embed
    return model.get_submodule(HF_PATHS[family][0])


def blocks(model, family: str) -> list[nn.Module]:
    if is_hooked(model):
        return list(model.blocks)
    return list(model.get_submodule(HF_PATHS[family][1]))


def _first(output):
    return output if isinstance(output, torch.Tensor) else output[0]


def _with_first(output, value):
    return value if isinstance(output, torch.Tensor) else (value, *output[1:])


@contextmanager
def _hf_site_hook(model, family, site: str, fn):
    """``fn(value) -> new value`` at one residual site of a Hugging Face model."""
    layers = blocks(model, family)
    layer = int(site.split(".")[1])
    if site.endswith("hook_resid_pre") and layer == 0:

        def pre(module, args):
            return (fn(args[0]), *args[1:])

        handle = layers[0].register_forward_pre_hook(pre)
    else:
        source = layers[layer - 1] if site.endswith("hook_resid_pre") else layers[layer]

        def post(module, args, output):
            return _with_first(output, fn(_first(output)))

        handle = source.register_forward_hook(post)
    try:
        yield
    finally:
        handle.remove()


def run(model, family: str, ids, embeddings=None, site_fns=()):
    """Logits (N, T, V) with the token embeddings replaced by ``embeddings`` (when
    given) and ``fn(value)`` applied at each ``(site, fn)`` of ``site_fns``."""
    if is_hooked(model):
        hooks = [(site, lambda value, hook, fn=fn: fn(value)) for site, fn in site_fns]
        if embeddings is not None:
            hooks.append(("hook_embed", lambda value, hook: embeddings.clone()))
        return model.run_with_hooks(ids, fwd_hooks=hooks)
    with ExitStack() as stack:
        if embeddings is not None:
            handle = embedding_module(model, family).register_forward_hook(
                lambda module, args, output: embeddings.clone()
            )
            stack.callback(handle.remove)
        for site, fn in site_fns:
            stack.enter_context(_hf_site_hook(model, family, site, fn))
        return model(input_ids=ids).logits


def activations(model, family: str, ids, embeddings=None) -> dict:
    """The residual sites' values (N, T, d) on one run, detached."""
    names = site_names(len(blocks(model, family)))
    store = {}

    def keeper(name):
        def keep(value):
            store[name] = value.detach().clone()
            return value

        return keep

    with torch.no_grad():
        run(model, family, ids, embeddings, [(n, keeper(n)) for n in names])
    return store


def last_logit(logits, tokens):
    return logits[:, -1].gather(1, tokens.view(-1, 1)).squeeze(1)


def activation_patching_loop(model, family, ids, baseline, tokens):
    """A[i, s, t] = F(x'_i | e_s,t <- e_s,t(x_i)) - F(x'_i), one forward each."""
    names = site_names(len(blocks(model, family)))
    clean = activations(model, family, ids)
    n_prompts, n_tokens = ids.shape
    out = torch.zeros(n_prompts, len(names), n_tokens)
    with torch.no_grad():
        for i in range(n_prompts):
            xi, bi, ci = ids[i : i + 1], baseline[i : i + 1], tokens[i : i + 1]
            base = last_logit(run(model, family, xi, bi), ci)
            for s, name in enumerate(names):
                for t in range(n_tokens):

                    def patch(value, s_name=name, i=i, t=t):
                        value = value.clone()
                        value[0, t] = clean[s_name][i, t]
                        return value

                    patched = run(model, family, xi, bi, [(name, patch)])
                    out[i, s, t] = last_logit(patched, ci) - base
    return out


def site_gradients(model, family, ids, embeddings, tokens) -> dict:
    """dF/de at every residual site, one backward per site: the site's value is
    replaced by a leaf tensor holding the same value."""
    names = site_names(len(blocks(model, family)))
    values = activations(model, family, ids, embeddings)
    grads = {}
    for name in names:
        leaf = values[name].clone().requires_grad_(True)
        with torch.enable_grad():
            logits = run(
                model, family, ids, embeddings, [(name, lambda value, leaf=leaf: leaf)]
            )
            (grad,) = torch.autograd.grad(last_logit(logits, tokens).sum(), leaf)
        grads[name] = grad
    return grads


def attribution_patching_by_hand(
    model, family, ids, baseline, tokens, alphas=(0.0,), weights=(1.0,)
):
    """(e(x) - e(x'))^T sum_k w_k dF/de(x' + a_k (E(x) - x')) per site and token."""
    names = site_names(len(blocks(model, family)))
    clean = activations(model, family, ids)
    base = activations(model, family, ids, baseline)
    embedded = clean_embeddings(model, family, ids)
    total = {name: 0.0 for name in names}
    for alpha, weight in zip(alphas, weights, strict=True):
        point = baseline + alpha * (embedded - baseline)
        grads = site_gradients(model, family, ids, point, tokens)
        for name in names:
            total[name] = total[name] + weight * grads[name]
    return torch.stack(
        [((clean[n] - base[n]) * total[n]).sum(-1) for n in names], dim=1
    )


def clean_embeddings(model, family, ids):
    """E(x): the token embeddings, read from the embedding matrix."""
    if is_hooked(model):
        return model.W_E[ids].detach()
    return embedding_module(model, family).weight[ids].detach()


class LastLogits(nn.Module):
    """token ids -> next-token logits at the last position (N, V)."""

    def __init__(self, model, family):
        super().__init__()
        self.model = model
        self.family = family

    def forward(self, ids):
        return run(self.model, self.family, ids)[:, -1]


class EmbeddingLastLogits(nn.Module):
    """token embeddings (with ``ids`` fixed) -> last-position logits (N, V)."""

    def __init__(self, model, family, ids):
        super().__init__()
        self.model = model
        self.family = family
        self.ids = ids

    def forward(self, embeddings):
        return run(self.model, self.family, self.ids, embeddings)[:, -1]


def unlearned_baselines_loop(model, family, ids, tokens, p_hat_of, steps, eps, mu):
    """Algorithm 1 lines 5-7 on the token embeddings, one prompt at a time:
    ``p_hat_of(i)`` gives the unlearned distribution of prompt i (1, V)."""
    out = []
    embedded = clean_embeddings(model, family, ids)
    for i in range(ids.shape[0]):
        forward = EmbeddingLastLogits(model, family, ids[i : i + 1])
        p_hat = p_hat_of(i)
        x = embedded[i : i + 1]
        delta = torch.zeros_like(x)
        for _ in range(steps):
            delta = delta.detach().requires_grad_(True)
            with torch.enable_grad():
                q = F.log_softmax(forward(x + delta), dim=1)
                kl = (p_hat * (p_hat.log() - q)).sum()
                (grad,) = torch.autograd.grad(kl, delta)
            delta = delta - mu * grad
            delta = eps * delta / delta.norm()
        out.append((x + delta).detach())
    return torch.cat(out)


class LinearBlock(nn.Module):
    """h + W h + (causal running mean of V h): linear in the residual stream."""

    def __init__(self, width: int):
        super().__init__()
        self.own = nn.Linear(width, width)
        self.mix = nn.Linear(width, width, bias=False)

    def forward(self, hidden_states):
        n_tokens = hidden_states.shape[1]
        causal = torch.tril(torch.ones(n_tokens, n_tokens))
        causal = causal / causal.sum(1, keepdim=True)
        return (
            hidden_states + self.own(hidden_states) + causal @ self.mix(hidden_states)
        )


class TokenTable(nn.Module):
    """Token embeddings read from a table that is neither ``weight`` nor ``W_E``."""

    def __init__(self, vocab: int, width: int):
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, width))

    def forward(self, input_ids):
        return self.table[input_ids]


class LinearLM(nn.Module):
    """A language model whose logits are affine in every residual activation:
    token + positional embeddings, linear blocks called with the keyword
    ``hidden_states``, a linear unembedding."""

    def __init__(
        self,
        vocab: int = 12,
        width: int = 8,
        layers: int = 2,
        seed: int = 0,
        table: bool = False,
    ):
        super().__init__()
        torch.manual_seed(seed)
        self.tok = TokenTable(vocab, width) if table else nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.randn(16, width))
        self.layers = nn.ModuleList(LinearBlock(width) for _ in range(layers))
        self.unembed = nn.Linear(width, vocab)

    def forward(self, input_ids):
        hidden = self.tok(input_ids) + self.pos[: input_ids.shape[1]]
        for layer in self.layers:
            hidden = layer(hidden_states=hidden)
        return self.unembed(hidden)


def linear_lm_site_values(model: LinearLM, embeddings):
    """The residual sites of :class:`LinearLM` computed by hand from embeddings."""
    hidden = embeddings + model.pos[: embeddings.shape[1]]
    values = []
    for layer in model.layers:
        values.append(hidden)
        hidden = layer(hidden)
    values.append(hidden)
    return values
