"""Algorithm 1 of UNI (the learned baselines), one sample at a time, written from
the paper without the package: a deep copy of the model takes the unlearning step in
place, and the PGD on the input is a plain loop. Used by the UNI tests and by the
metric tests that take UNI's baselines."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F


def unlearned_copy(model, loss_of, eta=1.0):
    """A deep copy of ``model`` after one ascent step of L2 length ``eta`` on
    ``loss_of(copy)``, one norm over every parameter that requires grad (a parameter
    the loss does not use has gradient zero)."""
    unlearned = copy.deepcopy(model)
    params = [p for p in unlearned.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss_of(unlearned), params, allow_unused=True)
    grads = [
        torch.zeros_like(p) if g is None else g
        for p, g in zip(params, grads, strict=True)
    ]
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            p.add_(eta * g / norm)
    return unlearned


def reference_unlearned_probs(model, sample_args, target, eta=1.0):
    """p̂ for one sample: deep copy, explicit ascent step written into the copy."""
    unlearned = copy.deepcopy(model)
    params = [p for p in unlearned.parameters() if p.requires_grad]
    if not params:
        params = list(unlearned.parameters())
        for p in params:
            p.requires_grad_(True)
    loss = F.cross_entropy(unlearned(*sample_args), target.reshape(1))
    grads = torch.autograd.grad(loss, params)
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            p.add_(eta * g / norm)
        return F.softmax(unlearned(*sample_args), dim=1)


def paper_epsilon(d):
    """The paper's 0.25 for 3x224x224 images at the same L2 size per element for
    ``d`` elements per sample: the package's default radius."""
    return 0.25 * math.sqrt(d / (3 * 224 * 224))


def reference_baselines(
    model, inputs, targets, extra=(), eta=1.0, steps=10, eps=None, mu=0.1
):
    """Algorithm 1 lines 1-7, one sample at a time, tuple inputs perturbed jointly;
    ``eps=None`` is the paper's size per element (:func:`paper_epsilon`)."""
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    if eps is None:
        eps = paper_epsilon(sum(x[0].numel() for x in inputs))
    out = [[] for _ in inputs]
    for i in range(inputs[0].shape[0]):
        xi = tuple(x[i : i + 1] for x in inputs)
        ei = tuple(e[i : i + 1] for e in extra)
        p_hat = reference_unlearned_probs(model, (*xi, *ei), targets[i], eta)
        deltas = [torch.zeros_like(x) for x in xi]
        for _ in range(steps):
            deltas = [d.detach().requires_grad_(True) for d in deltas]
            moved = [x + d for x, d in zip(xi, deltas, strict=True)]
            q = F.log_softmax(model(*moved, *ei), dim=1)
            kl = (p_hat * (p_hat.log() - q)).sum()
            grads = torch.autograd.grad(kl, deltas)
            deltas = [d - mu * g for d, g in zip(deltas, grads, strict=True)]
            norm = torch.sqrt(sum((d**2).sum() for d in deltas))
            deltas = [eps * d / norm for d in deltas]
        for slot, x, d in zip(out, xi, deltas, strict=True):
            slot.append((x + d).detach())
    return tuple(torch.cat(slot) for slot in out)
