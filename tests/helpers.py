"""Shared test utilities: tiny models and a bit-for-bit model snapshot."""

from __future__ import annotations

from dataclasses import dataclass

import torch
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
