"""The embedded default: BlockMNIST-style data, small trained models, the demo job.

``load_demo()`` gives the trained models and the held-out images, for tutorials and
for anyone who wants to evaluate a new method on them; ``captum-faithful demo`` runs
every method and metric on them and writes a report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from captum_faithful._utils import check_int
from captum_faithful.demo.data import DigitBlocks, make_blocks
from captum_faithful.demo.models import (
    FULL_RECIPE,
    QUICK_RECIPE,
    ensure_trained,
    load_models,
)

__all__ = ["Demo", "load_demo", "make_blocks", "DigitBlocks"]


@dataclass
class Demo:
    """The demo's trained models and data (see :func:`load_demo`)."""

    cnn: nn.Module
    vit: nn.Module
    saes: dict
    x_test: Tensor
    y_test: Tensor
    masks_test: Tensor
    x_train: Tensor
    y_train: Tensor
    accuracy: dict
    sae_explained_variance: dict = field(default_factory=dict)
    cache_dir: Path | None = None
    meta: dict = field(default_factory=dict)


def load_demo(
    quick: bool = False,
    device: str | torch.device = "cpu",
    seed: int = 0,
    show_progress: bool = False,
) -> Demo:
    """The demo's trained CNN, ViT and SAEs with the BlockMNIST-style test images.

    The models are trained on first use on the CPU (about five minutes with the full
    recipe, about a minute and a half with ``quick=True``) and cached under
    ``~/.cache/captum_faithful`` (or ``$CAPTUM_FAITHFUL_CACHE``), in a folder keyed by
    the training recipe and ``seed``; later calls load the cache. The SAEs are saved
    in sae-lens's folder format and loaded back with
    :func:`captum_faithful.sae.load_sae`.

    Args:
        quick (bool, optional): use the short training recipe (smaller, fewer epochs,
            SAEs at two layers instead of three). Default: False
        device (str or torch.device, optional): where the models and tensors go.
            Default: "cpu"
        seed (int, optional): seed of the data split, the rendering and the training.
            Default: 0
        show_progress (bool, optional): progress bars while training. Default: False

    Returns:
        Demo: with ``cnn`` and ``vit`` (a ``ViTForImageClassification``, eager
        attention) in eval mode, ``saes`` ({0-based block index: sae_lens.SAE}),
        ``x_test`` (N, 3, 32, 32) in [0, 1], ``y_test`` (N,), ``masks_test``
        (N, 1, 32, 32) bool evidence masks, ``x_train``, ``y_train``, ``accuracy``
        ({"cnn": float, "vit": float}, test accuracy) and
        ``sae_explained_variance`` ({block: float}, on the test images).

    Examples::

        >>> from captum_faithful.demo import load_demo
        >>> demo = load_demo(quick=True)
        >>> demo.cnn(demo.x_test[:4]).argmax(1), demo.y_test[:4]
    """
    if not isinstance(quick, bool):
        raise TypeError(f"`quick` must be a bool, got {quick!r}")
    check_int("seed", seed, minimum=0)
    device = torch.device(device)
    recipe = QUICK_RECIPE if quick else FULL_RECIPE
    folder = ensure_trained(recipe, seed, show_progress=show_progress)
    cnn, vit, saes, meta = load_models(folder, str(device))
    test = make_blocks("test", seed)
    train = make_blocks("train", seed)
    return Demo(
        cnn=cnn,
        vit=vit,
        saes=saes,
        x_test=test.images.to(device),
        y_test=test.labels.to(device),
        masks_test=test.masks.to(device),
        x_train=train.images.to(device),
        y_train=train.labels.to(device),
        accuracy=dict(meta["accuracy"]),
        sae_explained_variance={
            int(k): v for k, v in meta["sae_explained_variance"].items()
        },
        cache_dir=folder,
        meta=meta,
    )
