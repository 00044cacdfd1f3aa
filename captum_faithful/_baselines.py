"""Baseline presets: what a removed feature is replaced with.

Each preset is a callable ``inputs -> tensor`` of the same shape as ``inputs``, so it
can be passed as ``baselines=`` to every method and metric (the strings ``"zero"``,
``"mean"`` and ``"blur"`` select the same functions, see
:func:`captum_faithful._arguments.format_baselines`). They never modify their
argument. The public names are exported by :mod:`captum_faithful.metrics`.

:func:`monochrome_reference` is FEI's default reference (and the blank-image
diagnostic's): one random colour per sample and channel. It is not a preset, since
it draws from a generator, but it is a baseline all the same, so it lives here.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import Tensor

BLUR_KERNEL_SIZE = 11
BLUR_SIGMA = 5.0


def zero_baseline(inputs: Tensor) -> Tensor:
    r"""All-zero baseline of the shape of ``inputs``.

    Args:

        inputs (Tensor): Input batch, first dimension the examples.

    Returns:
        Tensor: ``torch.zeros_like(inputs)``.

    Examples::

        >>> baseline = zero_baseline(images)
    """
    _check_tensor(inputs)
    return torch.zeros_like(inputs)


def mean_baseline(inputs: Tensor) -> Tensor:
    r"""Per-sample, per-channel mean of ``inputs``, broadcast to its shape.

    For inputs with three or more dimensions (N, C, ...) each channel of each sample is
    replaced by its mean over the remaining dimensions; a 2-D input (N, D) is replaced
    by the per-sample mean over its D elements. Integer inputs (e.g. uint8 pixels)
    get the mean rounded to the nearest integer, in their dtype, so that the copies
    that mix inputs and baseline stay valid inputs.

    .. math::
        b_{n,c,\dots} = \frac{1}{|\Omega|} \sum_{\omega \in \Omega} x_{n,c,\omega}

    Args:

        inputs (Tensor): Input batch of at least two dimensions.

    Returns:
        Tensor: Baseline of the shape and dtype of ``inputs``.

    Examples::

        >>> baseline = mean_baseline(images)   # (N, C, H, W), constant per channel
    """
    _check_tensor(inputs)
    if inputs.dim() < 2:
        raise ValueError(
            "`baselines='mean'` needs inputs of shape (N, ...) with at least two "
            f"dimensions, got shape {tuple(inputs.shape)}"
        )
    dims = tuple(range(2, inputs.dim())) if inputs.dim() >= 3 else (1,)
    if inputs.is_floating_point() or inputs.is_complex():
        mean = inputs.mean(dim=dims, keepdim=True)
    else:
        exact = inputs.to(torch.float64).mean(dim=dims, keepdim=True)
        mean = exact.round().to(inputs.dtype)
    return mean.expand_as(inputs).clone()


def gaussian_kernel1d(
    kernel_size: int = BLUR_KERNEL_SIZE,
    sigma: float = BLUR_SIGMA,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Normalised 1-D Gaussian weights of odd length ``kernel_size``."""
    half = kernel_size // 2
    positions = torch.arange(-half, half + 1, dtype=torch.float64)
    weights = torch.exp(-(positions**2) / (2.0 * sigma**2))
    return (weights / weights.sum()).to(dtype=dtype, device=device)


def blur_baseline(inputs: Tensor) -> Tensor:
    r"""Gaussian-blurred copy of an image batch (N, C, H, W).

    Each channel is convolved on its own with a Gaussian of kernel size 11 and
    :math:`\sigma = 5` (the separable product of two 1-D kernels), after reflect
    padding of 5 pixels on every side, so the output has the input's shape.

    .. math::
        b = G_{\sigma=5}^{11 \times 11} * \operatorname{reflect\_pad}_5(x)

    Args:

        inputs (Tensor): Image batch of shape (N, C, H, W) with H, W > 5 (reflect
                    padding needs the image to be larger than the pad).

    Returns:
        Tensor: Blurred images, same shape, dtype and device as ``inputs``.

    Examples::

        >>> baseline = blur_baseline(images)
    """
    _check_tensor(inputs)
    if inputs.dim() != 4:
        raise ValueError(
            "`baselines='blur'` needs image inputs of shape (N, C, H, W), got shape "
            f"{tuple(inputs.shape)}"
        )
    half = BLUR_KERNEL_SIZE // 2
    if inputs.shape[2] <= half or inputs.shape[3] <= half:
        raise ValueError(
            f"`baselines='blur'` needs H and W > {half} for reflect padding, got "
            f"{inputs.shape[2]}x{inputs.shape[3]}"
        )
    dtype = inputs.dtype if inputs.is_floating_point() else torch.float32
    channels = inputs.shape[1]
    kernel = gaussian_kernel1d(dtype=dtype, device=inputs.device)
    padded = F.pad(inputs.to(dtype), (half, half, half, half), mode="reflect")
    horizontal = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, BLUR_KERNEL_SIZE)
    vertical = kernel.view(1, 1, -1, 1).expand(channels, 1, BLUR_KERNEL_SIZE, 1)
    blurred = F.conv2d(padded, horizontal, groups=channels)
    return F.conv2d(blurred, vertical, groups=channels).to(inputs.dtype)


def monochrome_reference(
    inputs: Tensor,
    generator: torch.Generator | None = None,
    value_range: tuple[float, float] | None = None,
) -> Tensor:
    """One random colour per sample and channel, shape (N, C, 1, 1).

    Each channel's colour is uniform between that channel's min and max in the sample
    (or in ``value_range`` when given, e.g. for constant images, whose own range is
    empty). The draw of a sample depends only on ``generator`` (one 64-bit number is
    drawn from it per call) and on the sample's values, not on the other samples of
    the batch: the same image gets the same colour alone or inside any batch.
    """
    n, channels = inputs.shape[:2]
    device = generator.device if generator is not None else torch.device("cpu")
    key = int(
        torch.randint(0, 2**62, (1,), generator=generator, device=device).item()
    ).to_bytes(8, "little")
    rows = inputs.detach().reshape(n, -1).cpu().contiguous()
    draws = torch.empty(n, channels, dtype=torch.float64)
    for i in range(n):
        digest = hashlib.blake2b(
            rows[i].view(torch.uint8).numpy().tobytes(), digest_size=8, key=key
        ).digest()
        seed = int.from_bytes(digest, "little") & (2**63 - 1)
        draws[i] = torch.rand(
            channels, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
        )
    draws = draws.view(n, channels, 1, 1).to(device=inputs.device, dtype=inputs.dtype)
    if value_range is not None:
        low, high = value_range
        return low + draws * (high - low)
    lowest = inputs.amin(dim=(2, 3), keepdim=True)
    highest = inputs.amax(dim=(2, 3), keepdim=True)
    return lowest + draws * (highest - lowest)


BASELINE_PRESETS = {"zero": zero_baseline, "mean": mean_baseline, "blur": blur_baseline}


def _check_tensor(inputs: object) -> None:
    if not isinstance(inputs, Tensor):
        raise TypeError(f"`inputs` must be a tensor, got {type(inputs).__name__}")
    if inputs.numel() == 0:
        raise ValueError("`inputs` must not be empty")
