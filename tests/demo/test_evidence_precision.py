import torch

from captum_faithful.demo.registry import EvidencePrecision


def test_evidence_precision_counts_the_top_block_pixels_inside_the_block():
    """Hand-counted: 4x4 images, a 2x2 block (k = 4); the map is summed over the
    channels before ranking; ties are broken by one fixed random order, so a map
    with no ranking at all scores the same for every image and batch."""
    images = torch.rand(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(3, 1, 4, 4)
    masks[0, 0, :2, :2] = 1  # top-left block
    masks[1, 0, 2:, 2:] = 1  # bottom-right block
    masks[2, 0, :2, 2:] = 1
    metric = EvidencePrecision(images, masks)
    attributions = torch.zeros(3, 2, 4, 4)
    # image 0: the block's four pixels rank first once the channels are summed
    # (each channel alone would put a pixel outside the block first)
    attributions[0, 0, :2, :2] = 1.0
    attributions[0, 1, 3, 3] = 1.5
    attributions[0, 0, 3, 3] = -1.0
    # image 1: three of the four top pixels in the block
    attributions[1, 0, 2:, 2:] = torch.tensor([[4.0, 3.0], [2.0, -1.0]])
    attributions[1, 0, 0, 0] = 1.0
    # image 2: a constant map, ranked by the tie-break order only
    values = metric(None, images, attributions)
    assert values[0] == 1.0 and values[1] == 0.75
    order = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    expected = float(masks[2].flatten()[order[:4]].mean())
    assert values[2] == expected
    # same value alone and in a shuffled batch
    shuffled = metric(None, images[[2, 0, 1]], attributions[[2, 0, 1]])
    assert torch.equal(shuffled, values[[2, 0, 1]])
    alone = metric(None, images[1:2], attributions[1:2])
    assert torch.equal(alone, values[1:2])
