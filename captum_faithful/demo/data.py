"""BlockMNIST-style colour images built from scikit-learn's bundled digit scans.

Each image (3 × 32 × 32, values in [0, 1]) has two 16 × 16 blocks, centred
horizontally, one in the top half and one in the bottom half (as in BlockMNIST; which
block holds the digit is random):

- the *evidence* block holds the class digit (a real 8 × 8 scan, upsampled);
- the *distractor* block holds, by default (``distractor="shuffled"``), a scan of a
  random digit drawn independently of the label, cut into 2 × 2 tiles that are
  shuffled. It has the ink amount, stroke width and colour of a digit but no readable
  shape, and since it is drawn without looking at the label it carries no class
  information at all (a real digit of another class would: it tells which class the
  image is *not*).
- with ``distractor="digit"`` it holds such a real digit instead: a whole scan of a
  class drawn uniformly from the nine classes other than the label (its shape is
  drawn independently of everything else in the image). A model can read it, and
  a method can attribute to it: the setting where features of the model's internal
  representation can carry class meaning outside the evidence. With two real
  digits the image would not say which one is the label (a classifier could not
  beat 50 %: measured, the quick recipe's CNN and ViT reached 0.51 and 0.47), so
  the evidence block also gets a one-pixel frame in the ink colour
  (:data:`FRAME_WIDTH`), inside the block: the frame says *where* the class is,
  the digit inside *which* it is. Everything else (block order, colours, noise) is
  the same as in the shuffled rendering of the same (seed, split, index,
  rendering), so the two renderings differ only in the distractor block and the
  frame.

The background is one random colour per image plus pixel noise. The ink colour is
random too and, image by image, either lighter or darker than the background, so no
static baseline colour (black, a blur, noise) is neutral: the colour-bias setting of
the UNI paper. The ground-truth evidence mask marks the digit's block.

The split of the scans is fixed by the seed: 80 % train the models; the held-out
20 % are cut into a validation part (a third: hyperparameters such as Feature-Gated
TransMM's layers and gates are chosen on it) and a disjoint test part (scored once,
with what was chosen). Every image is a deterministic function of (seed, split,
index, rendering).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from captum_faithful._utils import check_float, check_int, optional_import

IMAGE_SIZE = 32
BLOCK_SIZE = 16
N_CLASSES = 10
#: Both blocks span these columns (centred, aligned with 4- and 8-pixel patches).
COLUMNS = slice((IMAGE_SIZE - BLOCK_SIZE) // 2, (IMAGE_SIZE + BLOCK_SIZE) // 2)
#: Standard deviation of the per-pixel Gaussian noise on every image.
NOISE_STD = 0.06
#: The splits of :func:`make_blocks` and the code of each in the rendering seed.
SPLITS = {"train": 0, "test": 1, "validation": 2}
#: Share of the held-out scans in the validation part (the rest is the test part).
VALIDATION_FRACTION = 1 / 3
#: What the distractor block can hold: a tile-shuffled scan (the default) or a real
#: digit of another class.
DISTRACTORS = ("shuffled", "digit")
#: Appended to the rendering seed for the ``"digit"`` distractors' own draws.
_DIGIT_STREAM = 101
#: Width in pixels of the frame that marks the evidence block when the distractor
#: is a real digit (on the block's edge, inside it).
FRAME_WIDTH = 1


@dataclass(frozen=True)
class DigitBlocks:
    """A rendered split: images, labels, evidence masks and the distractor's box.

    Attributes:
        images (Tensor): (N, 3, 32, 32) float images in [0, 1].
        labels (Tensor): (N,) class of the digit.
        masks (Tensor): (N, 1, 32, 32) bool, True on the digit's 16 × 16 block.
        distractor_masks (Tensor): (N, 1, 32, 32) bool, True on the distractor block.
        ink (Tensor): (N, 1, 32, 32) ink density of the digit in [0, 1] (zero outside
            the digit's block; the frame of ``distractor="digit"`` not included),
            kept for tests and plots.
        distractor_labels (Tensor, optional): (N,) class of the scan in the
            distractor block (tile-shuffled or whole, see ``distractor``); None
            when :func:`render` was given no ``pool_labels``.
        distractor (str): ``"shuffled"`` or ``"digit"``, what the distractor
            block holds.
    """

    images: Tensor
    labels: Tensor
    masks: Tensor
    distractor_masks: Tensor
    ink: Tensor
    distractor_labels: Tensor | None = None
    distractor: str = "shuffled"


def load_scans() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 scikit-learn digit scans as (N, 8, 8) floats in [0, 1] and labels."""
    datasets = optional_import("sklearn.datasets", "demo")
    digits = datasets.load_digits()
    return digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int64)


def split_indices(
    n: int, seed: int = 0, test_fraction: float = 0.2
) -> tuple[np.ndarray, np.ndarray]:
    """A fixed, seeded train/test split of ``range(n)`` (sorted index arrays)."""
    check_int("n", n, minimum=2)
    check_float("test_fraction", test_fraction, 0.0, 1.0, False, False)
    order = np.random.default_rng([seed, 7]).permutation(n)
    n_test = max(1, int(round(n * test_fraction)))
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def split_scans(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Sorted, disjoint scan indices of the ``"train"``, ``"validation"`` and
    ``"test"`` splits of ``range(n)``.

    ``"train"`` is :func:`split_indices`'s training part; its held-out part is cut
    by a second seeded permutation into validation (:data:`VALIDATION_FRACTION`)
    and test.
    """
    train, held_out = split_indices(n, seed)
    order = np.random.default_rng([seed, 11]).permutation(len(held_out))
    n_validation = max(1, int(round(len(held_out) * VALIDATION_FRACTION)))
    if n_validation >= len(held_out):
        raise ValueError(f"{n} scans are too few for a validation and a test part")
    return {
        "train": train,
        "validation": np.sort(held_out[order[:n_validation]]),
        "test": np.sort(held_out[order[n_validation:]]),
    }


def _upsample(scans: np.ndarray) -> Tensor:
    """(N, 8, 8) scans → (N, 1, 16, 16) ink densities in [0, 1] (bilinear)."""
    ink = torch.from_numpy(scans).unsqueeze(1)
    ink = F.interpolate(ink, size=(BLOCK_SIZE, BLOCK_SIZE), mode="bilinear")
    return ink.clamp(0.0, 1.0)


def _shuffle_tiles(scan: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Permute the sixteen 2 × 2 tiles of an 8 × 8 scan."""
    tiles = scan.reshape(4, 2, 4, 2).transpose(0, 2, 1, 3).reshape(16, 2, 2)
    tiles = tiles[rng.permutation(16)]
    return tiles.reshape(4, 4, 2, 2).transpose(0, 2, 1, 3).reshape(8, 8)


def check_distractor(distractor: str) -> str:
    """``distractor`` if it is one of :data:`DISTRACTORS`, else a ValueError."""
    if not isinstance(distractor, str) or distractor not in DISTRACTORS:
        raise ValueError(
            f"`distractor` must be one of {DISTRACTORS}, got {distractor!r}"
        )
    return distractor


def _other_class_digits(
    labels: np.ndarray,
    pool_labels: np.ndarray,
    seed: int | list[int] | tuple[int, ...],
) -> np.ndarray:
    """Per image, the index of a pool scan whose class is drawn uniformly from the
    classes other than the image's label, the scan uniformly among that class's."""
    entropy = [seed] if isinstance(seed, (int, np.integer)) else list(seed)
    rng = np.random.default_rng([*entropy, _DIGIT_STREAM])
    by_class = [np.flatnonzero(pool_labels == c) for c in range(N_CLASSES)]
    empty = [c for c, members in enumerate(by_class) if len(members) == 0]
    if empty:
        raise ValueError(
            f"`pool_labels` has no scan of classes {empty}: a digit distractor of "
            "any other class needs every class in the pool"
        )
    # uniform over the nine other classes: shift the label by 1..9 (mod 10)
    classes = (np.asarray(labels) + rng.integers(1, N_CLASSES, size=len(labels))) % (
        N_CLASSES
    )
    return np.array(
        [by_class[c][rng.integers(0, len(by_class[c]))] for c in classes],
        dtype=np.int64,
    )


def render(
    scans: np.ndarray,
    labels: np.ndarray,
    pool: np.ndarray,
    seed: int | list[int] | tuple[int, ...],
    pool_labels: np.ndarray | None = None,
    distractor: str = "shuffled",
) -> DigitBlocks:
    """Render one image per scan.

    Args:
        scans (np.ndarray): (N, 8, 8) digit scans in [0, 1], the class evidence.
        labels (np.ndarray): (N,) their classes.
        pool (np.ndarray): (M, 8, 8) scans the distractors are drawn from.
        seed (int or sequence of int): entropy for numpy's ``default_rng``.
        pool_labels (np.ndarray, optional): (M,) classes of ``pool``; needed for
            ``distractor="digit"``. Default: None
        distractor (str, optional): ``"shuffled"``: a pool scan drawn uniformly and
            independently of ``labels``, its 2 × 2 tiles shuffled; ``"digit"``: a
            whole pool scan of a class drawn uniformly from the classes other than
            the label (from a random stream of its own, so block order, colours
            and noise are those of the shuffled rendering), and a frame of
            :data:`FRAME_WIDTH` pixels on the evidence block's edge.
            Default: "shuffled"

    Returns:
        DigitBlocks: the rendered images with their masks.
    """
    check_distractor(distractor)
    if distractor == "digit" and pool_labels is None:
        raise ValueError('`pool_labels` is needed for `distractor="digit"`')
    n = len(scans)
    rng = np.random.default_rng(seed)
    digit_top = rng.random(n) < 0.5
    lighter = rng.random(n) < 0.5
    background = np.where(
        lighter[:, None], rng.uniform(0.0, 0.5, (n, 3)), rng.uniform(0.5, 1.0, (n, 3))
    )
    contrast = rng.uniform(0.35, 0.5, (n, 3))
    ink_colour = background + np.where(lighter[:, None], contrast, -contrast)
    drawn = rng.integers(0, len(pool), size=n)
    # the shuffles are drawn in both renderings, so the noise below is the same
    distractors = np.stack([_shuffle_tiles(pool[j], rng) for j in drawn])
    noise = rng.normal(0.0, NOISE_STD, size=(n, 3, IMAGE_SIZE, IMAGE_SIZE))
    if distractor == "digit" and pool_labels is not None:  # None refused above
        drawn = _other_class_digits(labels, pool_labels, seed)
        distractors = pool[drawn]

    digit_ink = _upsample(scans)
    distractor_ink = _upsample(distractors)
    ink = torch.zeros(n, 1, IMAGE_SIZE, IMAGE_SIZE)
    other = torch.zeros(n, 1, IMAGE_SIZE, IMAGE_SIZE)
    masks = torch.zeros(n, 1, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.bool)
    distractor_masks = torch.zeros_like(masks)
    for i in range(n):
        rows = (0, BLOCK_SIZE) if digit_top[i] else (BLOCK_SIZE, 0)
        block = (slice(rows[0], rows[0] + BLOCK_SIZE), COLUMNS)
        ink[i, 0][block] = digit_ink[i, 0]
        masks[i, 0][block] = True
        block = (slice(rows[1], rows[1] + BLOCK_SIZE), COLUMNS)
        other[i, 0][block] = distractor_ink[i, 0]
        distractor_masks[i, 0][block] = True

    background_t = torch.from_numpy(background).float()[:, :, None, None]
    colour_t = torch.from_numpy(ink_colour).float()[:, :, None, None]
    density = ink + other
    if distractor == "digit":
        # block pixels within FRAME_WIDTH of a pixel outside it (or of the border)
        outside = F.pad((~masks).float(), [FRAME_WIDTH] * 4, value=1.0)
        near = F.max_pool2d(outside, 2 * FRAME_WIDTH + 1, stride=1) > 0
        frame = masks & near
        density = torch.maximum(density, frame.float())
    images = background_t * (1 - density) + colour_t * density
    images = (images + torch.from_numpy(noise).float()).clamp(0.0, 1.0)
    return DigitBlocks(
        images=images.contiguous(),
        labels=torch.from_numpy(np.asarray(labels, dtype=np.int64)),
        masks=masks,
        distractor_masks=distractor_masks,
        ink=ink,
        distractor_labels=(
            None
            if pool_labels is None
            else torch.from_numpy(np.asarray(pool_labels, dtype=np.int64)[drawn])
        ),
        distractor=distractor,
    )


def make_blocks(
    split: str = "test", seed: int = 0, rendering: int = 0, distractor: str = "shuffled"
) -> DigitBlocks:
    """A split of the scans rendered as BlockMNIST-style colour images.

    Args:
        split (str): ``"train"`` (80 % of the 1,797 scans), ``"validation"`` (a
            third of the other 20 %) or ``"test"`` (the rest); the split is fixed
            by ``seed`` (:func:`split_scans`) and the three are disjoint.
            Default: ``"test"``
        seed (int, optional): seed of the split and of the rendering. Default: 0
        rendering (int, optional): index of the rendering; other values give the same
            scans with new colours, block order and distractors (used as augmentation
            when training). Default: 0
        distractor (str, optional): what the distractor block holds:
            ``"shuffled"`` (a tile-shuffled scan, no class information) or
            ``"digit"`` (a real digit of a class other than the label; see the
            module's docstring). Default: "shuffled"

    Returns:
        DigitBlocks: images (N, 3, 32, 32), labels, evidence masks.

    Examples::

        >>> test = make_blocks("test", seed=0)
        >>> test.images.shape, test.masks.shape
        (torch.Size([239, 3, 32, 32]), torch.Size([239, 1, 32, 32]))
    """
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {tuple(SPLITS)}, got {split!r}")
    check_int("seed", seed, minimum=0)
    check_int("rendering", rendering, minimum=0)
    check_distractor(distractor)
    scans, labels = load_scans()
    index = split_scans(len(scans), seed)[split]
    # Distractors come from the split's own scans so that no scan of one split
    # appears in the images of another.
    return render(
        scans[index],
        labels[index],
        scans[index],
        [seed, SPLITS[split], rendering],
        pool_labels=labels[index],
        distractor=distractor,
    )
