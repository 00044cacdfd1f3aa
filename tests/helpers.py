"""Shared test utilities: tiny models, a digits set, a forward that fails on cue and
a bit-for-bit model snapshot."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def small_cnn(in_channels: int = 3, n_classes: int = 10, seed: int = 0) -> nn.Module:
    """A tiny ReLU CNN with random weights, in eval mode."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(64, n_classes),
    ).eval()


def fails_after(forward, calls: int):
    """``forward`` that raises ``RuntimeError("boom")`` from its ``calls + 1``-th call
    on (for checking what an exception in the middle of a method leaves behind)."""
    count = [0]

    def failing(*args, **kwargs):
        count[0] += 1
        if count[0] > calls:
            raise RuntimeError("boom")
        return forward(*args, **kwargs)

    return failing


def digit_images(size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits, bilinearly upsampled to 3 x size x size in [0, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.expand(-1, 3, -1, -1).contiguous(), torch.tensor(digits.target)


def four_conv_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 16, 10),
    )


@dataclass
class ModelSnapshot:
    """Everything about a model a method must leave as it found it."""

    state: dict
    requires_grad: dict
    training: dict
    hooks: dict

    @classmethod
    def take(cls, model: nn.Module) -> ModelSnapshot:
        return cls(
            state={k: v.detach().clone() for k, v in model.state_dict().items()},
            requires_grad={k: p.requires_grad for k, p in model.named_parameters()},
            training={k: m.training for k, m in model.named_modules()},
            hooks={k: _hook_counts(m) for k, m in model.named_modules()},
        )

    def assert_same(self, model: nn.Module) -> None:
        other = ModelSnapshot.take(model)
        assert self.state.keys() == other.state.keys()
        for key, value in self.state.items():
            assert torch.equal(value, other.state[key]), f"{key} changed"
        assert self.requires_grad == other.requires_grad, "requires_grad changed"
        assert self.training == other.training, "train/eval mode changed"
        assert self.hooks == other.hooks, "hooks left behind"


def _hook_counts(module: nn.Module) -> tuple:
    names = (
        "_forward_hooks",
        "_forward_pre_hooks",
        "_backward_hooks",
        "_backward_pre_hooks",
        "_state_dict_hooks",
    )
    return tuple(len(getattr(module, name, {}) or {}) for name in names)
