import numpy as np
import pytest
import torch

from captum_faithful.demo.data import (
    BLOCK_SIZE,
    _shuffle_tiles,
    load_scans,
    make_blocks,
    split_indices,
    split_scans,
)


@pytest.fixture(scope="module")
def test_split():
    return make_blocks("test", seed=0)


def test_deterministic_from_seed(test_split):
    again = make_blocks("test", seed=0)
    for name in ("images", "labels", "masks", "distractor_masks", "ink"):
        assert torch.equal(getattr(test_split, name), getattr(again, name))
    other = make_blocks("test", seed=1)
    assert not torch.equal(other.labels, test_split.labels)
    rerendered = make_blocks("test", seed=0, rendering=1)
    assert torch.equal(rerendered.labels, test_split.labels)
    assert not torch.equal(rerendered.images, test_split.images)


def test_split_is_fixed_disjoint_and_complete():
    scans, labels = load_scans()
    train, held_out = split_indices(len(scans), seed=0)
    assert len(np.intersect1d(train, held_out)) == 0
    assert len(train) + len(held_out) == len(scans) == 1797
    assert len(held_out) == round(0.2 * 1797)
    assert np.array_equal(split_indices(len(scans), seed=0)[1], held_out)
    splits = split_scans(len(scans), seed=0)
    assert np.array_equal(splits["train"], train)
    # validation and test never share a scan, and together are the held-out scans
    assert len(np.intersect1d(splits["validation"], splits["test"])) == 0
    assert np.array_equal(
        np.sort(np.concatenate([splits["validation"], splits["test"]])), held_out
    )
    assert len(splits["validation"]) == round(len(held_out) / 3)
    for name, index in splits.items():
        assert np.array_equal(index, np.sort(index))
        assert np.array_equal(split_scans(len(scans), seed=0)[name], index)
        assert torch.equal(
            make_blocks(name, seed=0).labels, torch.from_numpy(labels[index])
        )
    assert not np.array_equal(split_scans(len(scans), seed=1)["test"], splits["test"])


def test_validation_and_test_images_never_overlap():
    validation = make_blocks("validation", seed=0).images.flatten(1)
    test = make_blocks("test", seed=0).images.flatten(1)
    # no image of one part equals an image of the other (nor, by the scan split,
    # shows the same digit scan)
    assert not bool((validation[:, None] == test[None]).all(-1).any())


def test_digit_lies_inside_its_evidence_mask(test_split):
    images, masks, ink = test_split.images, test_split.masks, test_split.ink
    assert images.shape == (239, 3, 32, 32) and masks.shape == (239, 1, 32, 32)
    assert masks.dtype == torch.bool
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    # every bit of the digit's ink is inside the mask, and every image has ink
    assert not bool((ink > 0)[~masks].any())
    assert bool((ink.flatten(1) > 0.5).any(1).all())
    for mask, other in zip(masks[:, 0], test_split.distractor_masks[:, 0], strict=True):
        rows, cols = torch.nonzero(mask, as_tuple=True)
        # one 16x16 square, in the top or the bottom half
        assert int(mask.sum()) == BLOCK_SIZE**2
        assert (
            int(rows.max() - rows.min())
            == int(cols.max() - cols.min())
            == BLOCK_SIZE - 1
        )
        assert int(rows.min()) in (0, BLOCK_SIZE) and int(cols.min()) == 8
        assert int(other.sum()) == BLOCK_SIZE**2
        assert not bool((mask & other).any())


def test_ink_is_visible_and_polarity_varies(test_split):
    images, ink = test_split.images, test_split.ink
    background = ~(test_split.masks | test_split.distractor_masks)
    lighter = []
    for i in range(len(images)):
        on_ink = images[i][:, ink[i, 0] > 0.5].mean(1)
        off = images[i][:, background[i, 0]].mean(1)
        diff = (on_ink - off).mean()
        assert abs(float(diff)) > 0.2
        lighter.append(bool(diff > 0))
    # no static baseline colour is neutral: the digit is lighter in some images and
    # darker in others, in roughly equal shares
    share = np.mean(lighter)
    assert 0.35 < share < 0.65


def test_distractor_is_a_tile_shuffle():
    rng = np.random.default_rng(0)
    scan = np.arange(64, dtype=np.float32).reshape(8, 8)
    shuffled = _shuffle_tiles(scan, rng)

    def tiles(a):
        return sorted(
            tuple(a[r : r + 2, c : c + 2].ravel())
            for r in range(0, 8, 2)
            for c in range(0, 8, 2)
        )

    assert tiles(shuffled) == tiles(scan)
    assert not np.array_equal(shuffled, scan)


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        make_blocks("valid")
    with pytest.raises(ValueError, match="seed"):
        make_blocks("test", seed=-1)
    with pytest.raises(TypeError, match="rendering"):
        make_blocks("test", rendering=1.5)
