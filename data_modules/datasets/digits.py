"""MNIST-bags (Ilse et al., ICML 2018) on scikit-learn's bundled handwritten digits, so nothing is downloaded.

A bag is a set of digit images; it is positive iff it holds at least one `positive_digit`. Bag sizes are
round(Normal(mean_bag_size, std_bag_size)) clipped to >= 1 and images are drawn uniformly with replacement from the
split's pool (as Ilse et al.), so an image can recur across bags and within one. The 1797 8x8 digits are split once,
stratified by digit, into disjoint train/val/test pools (60/10/30 %): a test bag never shows an image seen in training.

`balanced=True` draws bags until each class has its quota (half positive), so AUROC on a few bags is stable; the bags
of each class are then Ilse's bags conditioned on that class. `balanced=False` is the original i.i.d. protocol. Bag
sizes correlate weakly with the label in both (a larger bag is more likely to hold the digit), as in the original.

Images are upsampled bilinearly to `image_size` and replicated to 3 channels as uint8, so the `PatchEmbedder` that
normalises slide patches on the device takes digit bags unchanged. Everything is a function of `seed`; each split has
its own random stream, so e.g. `num_train_bags` does not change the test bags.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import Dataset

from ..cohort.splits import SPLITS
from ..io import check
from .bag_base import BagLoaders

__all__ = ["DigitBagDataset", "DigitBagsDataModule"]

POOL_FRACTIONS = (0.6, 0.1, 0.3)  # of each digit's images, in SPLITS order
_MAX_DRAWS_PER_BAG = 100  # balanced sampling gives up when a class is rarer than about 1 bag in this many
_UPSAMPLE_CHUNK = 256  # images interpolated at once: bounds the float32 buffer for large image sizes


class DigitBagDataset(Dataset):
    """One item = one bag. Bags are index arrays into the shared image pool, so a split costs a few KB."""

    def __init__(
        self, split: str, images: torch.Tensor, positive: np.ndarray, bags: list[np.ndarray], labels: np.ndarray
    ) -> None:
        self.split, self.images, self.positive = split, images, positive
        self.bags, self.labels = bags, labels

    def __len__(self) -> int:
        return len(self.bags)

    def __getitem__(self, index: int) -> dict:
        bag = self.bags[index]
        patches = self.images[torch.from_numpy(bag)]  # (N, S, S)
        return {
            "patches": patches.unsqueeze(1).expand(-1, 3, -1, -1).contiguous(),
            "label": torch.tensor(int(self.labels[index])),
            "slide_id": f"{self.split}-{index:05d}",
            "instance_labels": torch.from_numpy(self.positive[bag]),
        }


class DigitBagsDataModule(BagLoaders):
    """MNIST-bags train/val/test bags of real handwritten digits (see the module docstring); predict = test.

    After `setup`, `pools` holds the image indices (into `sklearn.datasets.load_digits()`) of each split and
    `dataset(split).bags` the image indices of every bag.
    """

    num_classes = 2
    classes = ["negative", "positive"]

    def __init__(
        self,
        positive_digit: int = 9,
        mean_bag_size: float = 10,
        std_bag_size: float = 2,
        num_train_bags: int = 200,
        num_val_bags: int = 50,
        num_test_bags: int = 1000,
        image_size: int = 28,
        seed: int = 0,
        balanced: bool = True,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check("positive_digit", 0 <= positive_digit <= 9, "an int in 0-9", positive_digit)
        check("mean_bag_size", mean_bag_size > 0, "> 0", mean_bag_size)
        check("std_bag_size", std_bag_size >= 0, ">= 0", std_bag_size)
        for name, value in (
            ("num_train_bags", num_train_bags),
            ("num_val_bags", num_val_bags),
            ("num_test_bags", num_test_bags),
        ):
            check(name, value >= 1, "an int >= 1", value)
        check("image_size", image_size >= 8, "an int >= 8 (the digits are 8x8)", image_size)
        check("num_workers", num_workers >= 0, "an int >= 0", num_workers)
        self.save_hyperparameters()
        self.seed, self.num_workers = seed, num_workers
        self.pools: dict[str, np.ndarray] | None = None
        self._datasets: dict[str, DigitBagDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.pools is not None:
            return
        hp = self.hparams
        digits = load_digits()
        images = _upsample(digits.images, hp.image_size)
        positive = digits.target == hp.positive_digit
        pool_rng, *split_rngs = (np.random.default_rng(s) for s in np.random.SeedSequence(hp.seed).spawn(4))
        self.pools = _stratified_pools(digits.target, pool_rng)
        counts = (hp.num_train_bags, hp.num_val_bags, hp.num_test_bags)
        for split, rng, count in zip(SPLITS, split_rngs, counts, strict=True):
            bags, labels = _draw_bags(
                rng, self.pools[split], positive, count, hp.mean_bag_size, hp.std_bag_size, hp.balanced
            )
            self._datasets[split] = DigitBagDataset(split, images, positive, bags, labels)

    def dataset(self, split: str) -> DigitBagDataset:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.setup()
        return self._datasets[split]


def _upsample(images: np.ndarray, size: int) -> torch.Tensor:
    """(M, 8, 8) values 0-16 -> (M, size, size) uint8 0-255, bilinear with antialias."""
    x = torch.from_numpy(images).float().unsqueeze(1)
    out = torch.cat(
        [
            F.interpolate(chunk, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            for chunk in x.split(_UPSAMPLE_CHUNK)
        ]
    )
    return (out.squeeze(1) * (255 / 16)).round_().clamp_(0, 255).to(torch.uint8)


def _stratified_pools(targets: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Disjoint sorted image indices per split, each digit cut by POOL_FRACTIONS."""
    parts: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    for digit in np.unique(targets):
        members = rng.permutation(np.flatnonzero(targets == digit))
        cuts = np.rint(np.cumsum(POOL_FRACTIONS)[:-1] * len(members)).astype(int)
        for split, chunk in zip(SPLITS, np.split(members, cuts), strict=True):
            parts[split].append(chunk)
    return {split: np.sort(np.concatenate(chunks)) for split, chunks in parts.items()}


def _draw_bags(
    rng: np.random.Generator,
    pool: np.ndarray,
    positive: np.ndarray,
    num_bags: int,
    mean: float,
    std: float,
    balanced: bool,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Ilse et al.'s bags from `pool`; with `balanced`, bags of a class whose quota is full are drawn and dropped."""
    quota = [num_bags - num_bags // 2, num_bags // 2]  # negatives, positives
    bags: list[np.ndarray] = []
    labels: list[int] = []
    for _ in range(_MAX_DRAWS_PER_BAG * (num_bags + 10)):
        size = max(1, int(np.rint(rng.normal(mean, std))))
        bag = pool[rng.integers(0, len(pool), size)]
        label = int(positive[bag].any())
        if balanced:
            if quota[label] == 0:
                continue
            quota[label] -= 1
        bags.append(bag)
        labels.append(label)
        if len(bags) == num_bags:
            return bags, np.array(labels, dtype=np.int64)
    missing = "negative" if quota[0] else "positive"
    raise ValueError(
        f"balanced: {missing} bags are too rare to fill half of {num_bags} bags (mean_bag_size={mean}); "
        "change mean_bag_size or set balanced=False"
    )
