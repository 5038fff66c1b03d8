"""Stain augmentation (HED jitter through scikit-image): per-patch seeds, so a chunked backward's two passes and a
full-bag backward all see the same augmented patches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from data_modules.datasets.augment import StainedBag, StainJitter
from data_modules.synthetic import CohortSpec, render_region, write_slide
from icmil_pl.chunked import bag_backward


@pytest.fixture(scope="module")
def patches(tmp_path_factory) -> torch.Tensor:
    """Sixteen 32 px H&E patches of a generated slide, uint8 (16, 3, 32, 32)."""
    spec = CohortSpec(size=(256, 256), compression="lzw", tumour_contrast=1.0, tumour_area=(0.2, 0.3))
    info = write_slide(tmp_path_factory.mktemp("slide") / "s.tif", spec, seed=3, tumour=True, flavour="tiff", levels=1)
    image = render_region(info, (0, 0), (128, 128))
    tiles = [image[y : y + 32, x : x + 32] for y in range(0, 128, 32) for x in range(0, 128, 32)]
    return torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).contiguous()


def test_each_patch_draws_its_own_view_from_the_seed_and_its_index(patches):
    jitter = StainJitter(0.1, 0.01)
    whole = jitter(patches, seed=5)
    assert torch.equal(torch.cat([jitter(patches[:7], 5), jitter(patches[7:], 5, first=7)]), whole)
    assert not torch.equal(jitter(patches, seed=6), whole)
    change = (whole.float() - patches.float()).abs().mean()
    assert 3 < change < 30  # a visible shift of the stain, not a new image
    assert (StainJitter(0.0, 0.0)(patches, 5).float() - patches.float()).abs().mean() < 2  # rgb2hed round trip
    with pytest.raises(ValueError, match=r"stain_jitter\.(sigma|bias): expected a float in \[0, 1\)"):
        StainJitter(sigma=1.5)


class _Embedder(nn.Module):
    """uint8 patches -> 4 features, in float64 so that chunked and full-bag gradients compare to 1e-10."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).double()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.double() / 255)


def test_a_chunked_backward_through_stained_patches_equals_the_full_bag(patches):
    torch.manual_seed(0)
    embedder, head = _Embedder(), nn.Linear(4, 1).double()
    grads = []
    for chunk in (3, len(patches)):
        embedder.zero_grad()
        bag = StainedBag(patches, StainJitter(0.1, 0.01), seed=9)
        bag_backward(embedder, lambda h: head(h.mean(0)).sum(), bag, chunk)
        grads.append([p.grad.clone() for p in embedder.parameters()])
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(*grads, strict=True))
