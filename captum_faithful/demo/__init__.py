"""The embedded default: BlockMNIST-style data, small trained models, the demo job.

``load_demo()`` gives the trained models and the held-out images, for tutorials and
for anyone who wants to evaluate a new method on them; ``load_language_demo()`` a
tiny GPT-2 that recalls invented facts, with counterfactual prompt pairs;
``captum-faithful demo`` runs every method and metric on them and writes a report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from captum_faithful._utils import check_int
from captum_faithful.demo.data import DigitBlocks, check_distractor, make_blocks
from captum_faithful.demo.language import LanguageDemo, load_language_demo
from captum_faithful.demo.models import (
    FULL_RECIPE,
    QUICK_RECIPE,
    ensure_trained,
    load_models,
)

__all__ = [
    "Demo",
    "load_demo",
    "make_blocks",
    "DigitBlocks",
    "LanguageDemo",
    "load_language_demo",
]


@dataclass
class Demo:
    """The demo's trained models and data (see :func:`load_demo`).

    The images are BlockMNIST-style scans, ``(N, 3, 32, 32)`` floats in [0, 1]: the
    class evidence (a digit) fills one 16 × 16 block, a distractor another.

    Attributes:
        cnn (nn.Module): The trained CNN classifier, in eval mode.
        vit (nn.Module): The trained Vision Transformer, a Hugging Face
                    ``ViTForImageClassification`` with eager attention, in eval mode.
        saes (dict): ``{0-based block index: sae_lens.SAE}``, the SAEs trained on
                    the ViT's residual stream after those blocks.
        x_test (Tensor): The test images, on which methods are scored once.
        y_test (Tensor): ``(N,)`` their classes.
        masks_test (Tensor): ``(N, 1, 32, 32)`` bool, True on each image's evidence
                    block.
        x_train (Tensor): The training scans, in their first rendering (the models
                    were trained on several renderings of them).
        y_train (Tensor): Their classes.
        accuracy (dict): ``{"cnn": float, "vit": float}``, accuracy on the test
                    images.
        x_validation (Tensor, optional): The validation images, disjoint from the
                    test images: choose hyperparameters here (e.g. with
                    :func:`captum_faithful.select_gating`).
        y_validation (Tensor, optional): Their classes.
        masks_validation (Tensor, optional): Their evidence masks, as
                    ``masks_test``.
        sae_explained_variance (dict): ``{block index: float}``, the share of the
                    variance of the ViT's patch tokens each SAE reconstructs,
                    measured on renderings of the validation scans.
        sae_dead_fraction (dict): ``{block index: float}``, the share of each SAE's
                    features that never fire on those tokens.
        cache_dir (Path, optional): The folder the trained models were loaded from.
        meta (dict): The training record of that folder (``meta.json``): the
                    recipe, the seed, the measurements above, and the training's
                    thread count and seconds.
        distractor (str): What the distractor block holds, ``"shuffled"`` or
                    ``"digit"`` (see :func:`load_demo`).
        distractor_masks_test (Tensor, optional): ``(N, 1, 32, 32)`` bool, True on
                    each test image's distractor block.
    """

    cnn: nn.Module
    vit: nn.Module
    saes: dict
    x_test: Tensor
    y_test: Tensor
    masks_test: Tensor
    x_train: Tensor
    y_train: Tensor
    accuracy: dict
    x_validation: Tensor | None = None
    y_validation: Tensor | None = None
    masks_validation: Tensor | None = None
    sae_explained_variance: dict = field(default_factory=dict)
    sae_dead_fraction: dict = field(default_factory=dict)
    cache_dir: Path | None = None
    meta: dict = field(default_factory=dict)
    distractor: str = "shuffled"
    distractor_masks_test: Tensor | None = None


def load_demo(
    quick: bool = False,
    device: str | torch.device = "cpu",
    seed: int = 0,
    show_progress: bool = False,
    distractor: str = "shuffled",
) -> Demo:
    """The demo's trained CNN, ViT and SAEs with the BlockMNIST-style held-out images.

    The models are trained on first use on the CPU (at most ten minutes on two
    cores with the full recipe, about a minute with ``quick=True``) and cached
    under ``~/.cache/captum_faithful`` (or ``$CAPTUM_FAITHFUL_CACHE``), in a folder
    keyed by the training recipe, ``seed`` and ``distractor``; later calls load the
    cache. The SAEs
    are saved in sae-lens's folder format and loaded back with
    :func:`captum_faithful.sae.load_sae`.

    The held-out scans are split into a validation part (choose hyperparameters
    there, e.g. with :func:`captum_faithful.select_gating`) and a disjoint test part
    (score the chosen methods there once).

    Args:
        quick (bool, optional): use the short training recipe (a smaller ViT on
            8-pixel patches, fewer epochs, SAEs on three blocks instead of five).
            Default: False
        device (str or torch.device, optional): where the models and tensors go.
            Default: "cpu"
        seed (int, optional): seed of the data split, the rendering and the training.
            Default: 0
        show_progress (bool, optional): progress bars while training. Default: False
        distractor (str, optional): what the block beside the evidence holds, in
            every image the models are trained and evaluated on: ``"shuffled"``,
            a digit scan cut into shuffled 2 × 2 tiles (no class information), or
            ``"digit"``, a real digit of a class other than the label (see
            :mod:`captum_faithful.demo.data`). Each has its own trained models,
            with the same recipes. Default: "shuffled"

    Returns:
        Demo: with ``cnn`` and ``vit`` (a ``ViTForImageClassification``, eager
        attention) in eval mode, ``saes`` ({0-based block index: sae_lens.SAE}),
        ``x_test`` (N, 3, 32, 32) in [0, 1], ``y_test`` (N,), ``masks_test``
        (N, 1, 32, 32) bool evidence masks, the same for the validation part
        (``x_validation``, ``y_validation``, ``masks_validation``), ``x_train``,
        ``y_train``, ``accuracy`` ({"cnn": float, "vit": float}, on the test
        part), and per SAE block ``sae_explained_variance`` and
        ``sae_dead_fraction`` (the share of features that never fire), measured on
        the patch tokens of eight renderings of the validation scans (see
        :func:`captum_faithful.demo.models.held_out_tokens`); ``distractor`` and
        ``distractor_masks_test``.

    Examples::

        >>> from captum_faithful.demo import load_demo
        >>> demo = load_demo(quick=True)
        >>> demo.cnn(demo.x_test[:4]).argmax(1), demo.y_test[:4]
    """
    if not isinstance(quick, bool):
        raise TypeError(f"`quick` must be a bool, got {quick!r}")
    check_int("seed", seed, minimum=0)
    check_distractor(distractor)
    device = torch.device(device)
    recipe = QUICK_RECIPE if quick else FULL_RECIPE
    folder = ensure_trained(
        recipe, seed, show_progress=show_progress, distractor=distractor
    )
    cnn, vit, saes, meta = load_models(folder, str(device))
    test = make_blocks("test", seed, distractor=distractor)
    validation = make_blocks("validation", seed, distractor=distractor)
    train = make_blocks("train", seed, distractor=distractor)
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
        x_validation=validation.images.to(device),
        y_validation=validation.labels.to(device),
        masks_validation=validation.masks.to(device),
        sae_explained_variance={
            int(k): v for k, v in meta["sae_explained_variance"].items()
        },
        sae_dead_fraction={int(k): v for k, v in meta["sae_dead_fraction"].items()},
        cache_dir=folder,
        meta=meta,
        distractor=distractor,
        distractor_masks_test=test.distractor_masks.to(device),
    )
