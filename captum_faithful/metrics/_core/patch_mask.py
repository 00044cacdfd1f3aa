"""Feature masks of square patches, for patch-level attributions (e.g. ViT)."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor


def patch_mask(
    inputs: Tensor | tuple[Tensor, ...], patch_size: int | tuple[int, int]
) -> Tensor | tuple[Tensor, ...]:
    r"""A ``feature_mask`` that groups the pixels of each ``patch_size`` patch.

    Patches are numbered row by row; all channels of a patch form one feature. When
    H or W is not a multiple of the patch size, the last row/column of patches is
    smaller. For a tuple of inputs, the ids continue from one tensor to the next so
    that every patch is its own feature.

    .. math::
        m_{i,j} = \lfloor i / p_h \rfloor \cdot \lceil W / p_w \rceil
        + \lfloor j / p_w \rfloor

    Args:

        inputs (Tensor or tuple[Tensor, ...]): Image batch(es) of shape (N, C, H, W);
                    only the shape and device are used.
        patch_size (int or tuple[int, int]): Patch height and width (one int for square
                    patches), each >= 1.

    Returns:
        Tensor or tuple[Tensor, ...]: int64 mask(s) of shape (1, 1, H, W), mirroring
        ``inputs``.

    Examples::

        >>> mask = patch_mask(images, 16)           # 14 x 14 patches for 224 x 224
        >>> auc = insertion_auc(model, images, attributions, feature_mask=mask)
    """
    if isinstance(patch_size, numbers.Integral) and not isinstance(patch_size, bool):
        patch_size = (int(patch_size), int(patch_size))
    if (
        not isinstance(patch_size, (tuple, list))
        or len(patch_size) != 2
        or not all(
            isinstance(p, numbers.Integral) and not isinstance(p, bool) and p >= 1
            for p in patch_size
        )
    ):
        raise ValueError(
            "`patch_size` must be a positive int or a pair of positive ints, got "
            f"{patch_size!r}"
        )
    is_tuple = isinstance(inputs, (tuple, list))
    items = tuple(inputs) if is_tuple else (inputs,)
    masks, offset = [], 0
    for x in items:
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(
                "`inputs` must be image tensors of shape (N, C, H, W), got "
                f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}"
            )
        height, width = x.shape[2:]
        ph, pw = int(patch_size[0]), int(patch_size[1])
        columns = -(-width // pw)
        rows = torch.arange(height, device=x.device) // ph
        cols = torch.arange(width, device=x.device) // pw
        mask = rows.view(-1, 1) * columns + cols.view(1, -1) + offset
        offset += (-(-height // ph)) * columns
        masks.append(mask.view(1, 1, height, width))
    return tuple(masks) if is_tuple else masks[0]
