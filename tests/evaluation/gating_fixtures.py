"""A small ViT with SAEs on two blocks and a few images, for the select_gating tests
(imported by the tests and by the torchrun worker, so both build the same ones)."""

from __future__ import annotations

import torch
from sae_factory import make_sae

IMAGE = 16
PATCH = 4  # a 4 x 4 grid: 16 patch tokens, an even count
HIDDEN = 32


def vit():
    """Three blocks, so that gates at blocks 0 and 1 both reach the CLS token."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(3)
    config = ViTConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=IMAGE,
        patch_size=PATCH,
        num_labels=5,
        initializer_range=0.3,
    )
    return ViTForImageClassification(config).eval()


def saes():
    return {
        0: make_sae("topk", d_in=HIDDEN, d_sae=128, k=8, seed=5),
        1: make_sae("topk", d_in=HIDDEN, d_sae=128, k=8, seed=6),
    }


def images(n: int = 6):
    return torch.rand(n, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(9))


def grid():
    """The small search grid of the sharded run (the test and its workers)."""
    return dict(layers=[0, (0, 1)], kappas=[0.5, 2.0], c_maxs=[5.0], batch_size=1)
