"""Shared test utilities: tiny models (one that counts its forwards, one whose pixel
contributions are known exactly), a digits set, a forward that fails on cue, a
bit-for-bit model snapshot, and what a test needs to start a child Python."""

from __future__ import annotations

import os
import socket
import sys
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


class CountingModel(nn.Module):
    """``model`` that counts its forward calls in ``calls``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.model(x)


class PixelSum(nn.Module):
    """Two outputs: output 0 is ``(x * weight).sum()`` over each example, so that each
    pixel's exact contribution to it is ``x * weight``; output 1 is ``second`` times
    output 0 (0: a constant second class; -1: output 0 mirrored)."""

    def __init__(self, weight: torch.Tensor, second: float = 0.0):
        super().__init__()
        self.weight = weight
        self.second = second

    def forward(self, x):
        total = (x * self.weight).flatten(1).sum(1)
        return torch.stack([total, self.second * total], dim=1)


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


def child_env(**variables: str) -> dict[str, str]:
    """This process's environment plus ``variables``, with ``PYTHONPATH`` set to this
    process's ``sys.path``: a child Python (a worker script, ``python -c``) imports
    the same ``captum_faithful`` and the same test support modules as the test (the
    folders pytest's ``pythonpath`` setting put there)."""
    path = os.pathsep.join(p for p in sys.path if p)
    return {**os.environ, "PYTHONPATH": path, **variables}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for torch.distributed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
