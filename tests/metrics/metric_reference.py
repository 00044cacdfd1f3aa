"""Slow, obviously-correct per-image reference implementations of the metrics.

Everything here loops over images, features and perturbations in plain Python and
forwards one image at a time, so that the batched metrics can be checked against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def blur_reference(x):
    """Gaussian blur with a full 11x11 kernel (sigma 5) on a reflect-padded image."""
    positions = torch.arange(-5, 6, dtype=torch.float64)
    g = torch.exp(-(positions**2) / 50.0)
    kernel2d = torch.outer(g, g)
    kernel2d = (kernel2d / kernel2d.sum()).to(x.dtype)
    channels = x.shape[1]
    padded = F.pad(x, (5, 5, 5, 5), mode="reflect")
    weight = kernel2d.expand(channels, 1, 11, 11)
    return F.conv2d(padded, weight, groups=channels)


def reference_baseline(kind, x):
    if kind == "zero":
        return torch.zeros_like(x)
    if kind == "mean":
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    if kind == "blur":
        return blur_reference(x)
    raise AssertionError(kind)


def image_feature_ids(mask, x, n):
    """Feature ids of every element of image n (shape of x[n]), as a tensor."""
    if mask is None:
        h, w = x.shape[2:]
        return torch.arange(h * w).view(1, h, w).expand(x.shape[1:])
    mask = mask.reshape((1,) * (x.dim() - mask.dim()) + tuple(mask.shape))
    m = mask[n] if mask.shape[0] > 1 else mask[0]
    return m.expand(x.shape[1:])


def ordered_features(attr_n, ids):
    """Features of one image in descending summed attribution, ties by id."""
    feature_list = sorted(set(ids.reshape(-1).tolist()))
    a = attr_n.to(torch.float64).expand(ids.shape)
    score = {f: float(a[ids == f].sum()) for f in feature_list}
    order = sorted(feature_list, key=lambda f: (-score[f], f))
    return order, score


def score_one(model, img, cls, softmax):
    out = model(img.unsqueeze(0))
    if softmax:
        out = torch.softmax(out, dim=1)
    return float(out[0, cls])


def predicted(model, x, n, target):
    if target is None:
        return int(model(x[n : n + 1]).argmax())
    return int(target[n]) if not isinstance(target, int) else target


@torch.no_grad()
def reference_curves(
    model, x, attr, baseline, mask, n_steps, insertion, softmax, target=None
):
    curves = []
    for n in range(x.shape[0]):
        ids = image_feature_ids(mask, x, n)
        order, _ = ordered_features(attr[n], ids)
        n_features = len(order)
        cls = predicted(model, x, n, target)
        curve = []
        for k in range(n_steps + 1):
            count = round(k * n_features / n_steps)
            selected = torch.isin(ids, torch.tensor(order[:count], dtype=ids.dtype))
            if insertion:
                img = torch.where(selected, x[n], baseline[n])
            else:
                img = torch.where(selected, baseline[n], x[n])
            curve.append(score_one(model, img, cls, softmax))
        curves.append(curve)
    curves = torch.tensor(curves, dtype=torch.float64)
    aucs = torch.tensor(
        [
            sum((c[k - 1] + c[k]) / 2 for k in range(1, n_steps + 1)) / n_steps
            for c in curves.tolist()
        ],
        dtype=torch.float64,
    )
    return aucs, curves


@torch.no_grad()
def reference_saco(model, x, attr, baseline, mask, n_groups, softmax, target=None):
    values, all_pairs = [], []
    for n in range(x.shape[0]):
        ids = image_feature_ids(mask, x, n)
        order, score = ordered_features(attr[n], ids)
        groups = [list(g) for g in torch.tensor(order).tensor_split(n_groups)]
        cls = predicted(model, x, n, target)
        clean = score_one(model, x[n], cls, softmax)
        s, delta = [], []
        for group in groups:
            s.append(sum(score[int(f)] for f in group))
            removed = torch.isin(ids, torch.tensor(group, dtype=ids.dtype))
            img = torch.where(removed, baseline[n], x[n])
            delta.append(clean - score_one(model, img, cls, softmax))
        num, den, pairs = 0.0, 0.0, []
        for i in range(n_groups):
            for j in range(i + 1, n_groups):
                w = (s[i] - s[j]) if delta[i] >= delta[j] else -(s[i] - s[j])
                pairs.append(w)
                num += w
                den += abs(w)
        values.append(num / den if den > 0 else float("nan"))
        all_pairs.append(pairs)
    return torch.tensor(values, dtype=torch.float64), all_pairs


@torch.no_grad()
def reference_faithfulness_correlation(
    model, x, attr, baseline, mask, size, n_samples, seed, softmax, target=None
):
    """Per-image, per-subset loop; subsets drawn with the documented protocol: a
    numpy PCG64 generator seeded by one draw from the torch generator gives
    n_samples x F float32 keys, shared by every example; a subset = the ``size``
    smallest keys."""
    import numpy as np
    import scipy.stats

    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
    n_features = len(set(image_feature_ids(mask, x, 0).reshape(-1).tolist()))
    keys = torch.from_numpy(rng.random((n_samples, n_features), dtype=np.float32))
    pearson, spearman = [], []
    for n in range(x.shape[0]):
        ids = image_feature_ids(mask, x, n)
        feature_list = sorted(set(ids.reshape(-1).tolist()))
        a = attr[n].to(torch.float64).expand(ids.shape)
        cls = predicted(model, x, n, target)
        clean = score_one(model, x[n], cls, softmax)
        sums, drops = [], []
        for row in keys:
            chosen = [feature_list[i] for i in row.argsort(stable=True)[:size].tolist()]
            removed = torch.isin(ids, torch.tensor(chosen, dtype=ids.dtype))
            sums.append(float(a[removed].sum()))
            img = torch.where(removed, baseline[n], x[n])
            drops.append(clean - score_one(model, img, cls, softmax))
        pearson.append(scipy.stats.pearsonr(sums, drops)[0])
        spearman.append(scipy.stats.spearmanr(sums, drops)[0])
    return torch.tensor(pearson, dtype=torch.float64), torch.tensor(
        spearman, dtype=torch.float64
    )
