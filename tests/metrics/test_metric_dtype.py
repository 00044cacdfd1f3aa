"""One dtype rule for every metric: float64 on the inputs' device, whatever the
model's dtype (captum_faithful.metrics' docstring, docs/methods.md "Precision")."""

import pytest
import torch
from torch import nn

import captum_faithful.metrics as metrics

NOT_METRICS = {"blur_baseline", "mean_baseline", "zero_baseline", "patch_mask"}


def _model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return (
        nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * 8 * 8, 5),
        )
        .to(dtype)
        .eval()
    )


def _saliency(model: nn.Module, inputs: torch.Tensor, target) -> torch.Tensor:
    inputs = inputs.detach().requires_grad_()
    out = model(inputs)
    chosen = out.argmax(1) if target is None else target
    (grad,) = torch.autograd.grad(out.gather(1, chosen.view(-1, 1)).sum(), inputs)
    return grad


def _outputs(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor every metric returns, for a model and inputs in ``dtype``."""
    model = _model(dtype)
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 8, 8, generator=generator).to(dtype)
    a = torch.randn(3, 3, 8, 8, generator=generator).to(dtype)
    mask = metrics.patch_mask(x, 2)
    out = {}
    for name in ("insertion_auc", "deletion_auc"):
        auc, curves = getattr(metrics, name)(
            model, x, a, feature_mask=mask, n_steps=4, return_curves=True
        )
        out[name], out[f"{name} curves"] = auc, curves
    out["saco"] = metrics.saco(model, x, a, feature_mask=mask, n_groups=4)
    out["faithfulness_correlation"] = metrics.faithfulness_correlation(
        model,
        x,
        a,
        feature_mask=mask,
        n_samples=6,
        generator=torch.Generator().manual_seed(2),
    )
    out["path_monotonicity"] = metrics.path_monotonicity(
        model, x, torch.zeros_like(x), n_steps=4
    )
    for key, value in metrics.activation_deviation(model, model[1], x, x + 0.1).items():
        out[f"activation_deviation {key}"] = value
    for key, value in metrics.insertion_activation_deviation(
        model, model[1], x, a, feature_mask=mask, n_steps=4
    ).items():
        out[f"insertion_activation_deviation {key}"] = value
    for key, value in metrics.parameter_randomization(
        _saliency, model, x, generator=torch.Generator().manual_seed(3)
    ).items():
        out[f"parameter_randomization {key}"] = value
    estimate = torch.randn(3, 2, 5, generator=generator).to(dtype)
    exact = estimate + torch.randn(3, 2, 5, generator=generator).to(dtype)
    out["patching_distance"] = metrics.patching_distance(estimate, exact)
    out["patching_rank_correlation"] = metrics.patching_rank_correlation(
        estimate, exact
    )
    return out


def test_every_metric_is_covered():
    """A new metric in ``__all__`` must be added to ``_outputs``."""
    covered = {key.split(" ")[0] for key in _outputs(torch.float32)}
    assert covered == set(metrics.__all__) - NOT_METRICS


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_every_metric_returns_float64(dtype):
    wrong = {
        key: value.dtype
        for key, value in _outputs(dtype).items()
        if value.dtype != torch.float64
    }
    assert not wrong


def test_float64_output_keeps_the_float32_model_value():
    """The float64 values of a float32 model are its float32 computation widened,
    not a different computation: they agree with the same model in float64 to
    float32 precision (ranks and signs identical, magnitudes to 1e-4)."""
    single, double = _outputs(torch.float32), _outputs(torch.float64)
    for key in single:
        torch.testing.assert_close(
            single[key], double[key], atol=1e-4, rtol=1e-4, msg=key
        )
