"""MNIST-bags on scikit-learn's digits: labels, balance, bag sizes, disjoint pools, determinism, pixels, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import norm
from skimage.transform import resize
from sklearn.datasets import load_digits

from data_modules.cohort.splits import SPLITS
from data_modules.datasets.digits import DigitBagsDataModule

DIGITS = load_digits()


def _module(**kwargs) -> DigitBagsDataModule:
    dm = DigitBagsDataModule(**kwargs)
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def default_dm() -> DigitBagsDataModule:
    return _module()


def _size_pmf(mean: float, std: float, n_max: int) -> np.ndarray:
    """P(bag size = n) for n = 0..n_max under round(Normal(mean, std)) clipped to >= 1."""
    upper = norm.cdf((np.arange(n_max + 1) + 0.5 - mean) / std)
    pmf = np.diff(upper, prepend=0.0)
    pmf[1] += pmf[0]
    pmf[0] = 0.0
    return pmf


@pytest.mark.parametrize("digit", [9, 3])
def test_labels_follow_the_positive_digit(digit: int) -> None:
    dm = _module(positive_digit=digit, image_size=8, num_test_bags=200)
    for split in SPLITS:
        dataset = dm.dataset(split)
        for index in range(len(dataset)):
            item = dataset[index]
            truth = DIGITS.target[dataset.bags[index]] == digit
            assert item["slide_id"] == f"{split}-{index:05d}"
            assert item["instance_labels"].dtype == torch.bool
            assert item["instance_labels"].tolist() == truth.tolist()
            assert item["label"].dtype == torch.long and item["label"].shape == ()
            assert item["label"].item() == int(truth.any()) == int(item["instance_labels"].any())


def test_balanced_splits_are_half_positive(default_dm: DigitBagsDataModule) -> None:
    for split, count in zip(SPLITS, (200, 50, 1000), strict=True):
        labels = default_dm.dataset(split).labels
        assert len(labels) == count and labels.sum() == count // 2
    odd = _module(num_train_bags=51, num_val_bags=1, num_test_bags=3, image_size=8)
    assert [int(odd.dataset(s).labels.sum()) for s in SPLITS] == [25, 0, 1]


def test_unbalanced_positive_rate_is_the_protocol_rate() -> None:
    """balanced=False is i.i.d.: P(positive) = sum_n P(n) (1 - q^n) with q the pool's fraction of other digits."""
    dm = _module(balanced=False, num_train_bags=4000, image_size=8)
    q = 1 - np.mean(DIGITS.target[dm.pools["train"]] == 9)
    pmf = _size_pmf(10, 2, 40)
    expected = float(np.sum(pmf * (1 - q ** np.arange(41))))
    rate = dm.dataset("train").labels.mean()
    assert abs(rate - expected) < 0.025, (rate, expected)  # 3.3 standard errors
    assert 0.55 < expected < 0.75


@pytest.mark.parametrize(("mean", "std"), [(10, 2), (25, 5), (4, 0)])
def test_bag_sizes_have_the_requested_distribution(mean: float, std: float) -> None:
    dm = _module(mean_bag_size=mean, std_bag_size=std, balanced=False, num_train_bags=3000, image_size=8)
    sizes = np.array([len(bag) for bag in dm.dataset("train").bags])
    assert abs(sizes.mean() - mean) < 4 * max(std, 0.1) / np.sqrt(len(sizes))
    assert abs(sizes.std() - np.sqrt(std**2 + (1 / 12 if std else 0))) < 0.06 * max(std, 1)  # + rounding variance


def test_bag_sizes_are_clipped_to_one() -> None:
    dm = _module(mean_bag_size=1, std_bag_size=3, balanced=False, num_train_bags=3000, image_size=8)
    sizes = np.array([len(bag) for bag in dm.dataset("train").bags])
    assert sizes.min() == 1
    assert abs(np.mean(sizes == 1) - _size_pmf(1, 3, 20)[1]) < 0.03  # ~0.57: everything below 1.5 becomes 1


def test_pools_are_disjoint_stratified_and_bags_stay_in_their_pool(default_dm: DigitBagsDataModule) -> None:
    pools = default_dm.pools
    everything = np.concatenate([pools[s] for s in SPLITS])
    assert len(everything) == len(np.unique(everything)) == len(DIGITS.target)  # disjoint and complete
    for digit in range(10):
        count = np.sum(DIGITS.target == digit)
        per_split = [np.sum(DIGITS.target[pools[s]] == digit) for s in SPLITS]
        assert np.all(np.abs(np.array(per_split) - np.array([0.6, 0.1, 0.3]) * count) <= 1)
    for split in SPLITS:
        used = np.concatenate(default_dm.dataset(split).bags)
        assert np.isin(used, pools[split]).all()
    assert len(np.unique(np.concatenate(default_dm.dataset("test").bags))) > 0.9 * len(pools["test"])


def _bags(dm: DigitBagsDataModule) -> list[np.ndarray]:
    return [bag for split in SPLITS for bag in dm.dataset(split).bags]


def test_same_seed_same_bags_other_seed_other_bags(default_dm: DigitBagsDataModule) -> None:
    same = _module(image_size=8)
    assert all(np.array_equal(a, b) for a, b in zip(_bags(default_dm), _bags(same), strict=True))
    assert all(np.array_equal(default_dm.pools[s], same.pools[s]) for s in SPLITS)
    other = _module(seed=1, image_size=8)
    assert not np.array_equal(default_dm.pools["train"], other.pools["train"])
    assert not all(np.array_equal(a, b) for a, b in zip(_bags(default_dm), _bags(other), strict=True))
    # each split has its own stream: more training bags leave the test bags unchanged
    more = _module(num_train_bags=300, image_size=8)
    assert all(
        np.array_equal(a, b) for a, b in zip(default_dm.dataset("test").bags, more.dataset("test").bags, strict=True)
    )


def _batches(loader) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    return [(b["slide_id"], b["patches"], b["label"]) for b in loader]


def test_loaders_are_seeded_and_independent_of_workers() -> None:
    kwargs = dict(num_train_bags=30, num_val_bags=10, num_test_bags=10, image_size=16)
    serial, parallel = _module(**kwargs), _module(**kwargs, num_workers=2)
    train = _batches(serial.train_dataloader())
    ids = [slide_id for slide_id, _, _ in train]
    assert sorted(ids) == [f"train-{i:05d}" for i in range(30)] and ids != sorted(ids)  # shuffled, all bags once
    assert ids == [slide_id for slide_id, _, _ in _batches(_module(**kwargs).train_dataloader())]
    assert [b["slide_id"] for b in serial.predict_dataloader()] == [f"test-{i:05d}" for i in range(10)]
    for a_loader, b_loader in (
        (serial.train_dataloader(), parallel.train_dataloader()),
        (serial.val_dataloader(), parallel.val_dataloader()),
    ):
        for (id_a, x_a, y_a), (id_b, x_b, y_b) in zip(_batches(a_loader), _batches(b_loader), strict=True):
            assert id_a == id_b and torch.equal(x_a, x_b) and torch.equal(y_a, y_b)


@pytest.mark.parametrize("size", [28, 64])
def test_patches_are_upsampled_digits(size: int) -> None:
    dm = _module(image_size=size, num_train_bags=20, num_val_bags=1, num_test_bags=1)
    dataset = dm.dataset("train")
    for index in range(len(dataset)):
        patches = dataset[index]["patches"]
        assert patches.dtype == torch.uint8 and patches.shape == (len(dataset.bags[index]), 3, size, size)
        assert patches.is_contiguous()
        assert torch.equal(patches[:, 0], patches[:, 1]) and torch.equal(patches[:, 0], patches[:, 2])
        for image, source in zip(patches[:, 0].numpy(), dataset.bags[index], strict=True):
            reference = resize(
                DIGITS.images[source], (size, size), order=1, mode="edge", anti_aliasing=False, preserve_range=True
            ) * (255 / 16)
            assert np.abs(image - reference).max() <= 1
            assert np.corrcoef(image.ravel(), reference.ravel())[0, 1] > 0.99
    values = torch.cat([dataset[i]["patches"] for i in range(len(dataset))])
    assert values.min() == 0 and values.max() == 255  # 0-16 spans the full uint8 range


def test_native_size_keeps_the_digits() -> None:
    dataset = _module(image_size=8, num_train_bags=5).dataset("train")
    for index in range(len(dataset)):
        expected = np.rint(DIGITS.images[dataset.bags[index]] * 255 / 16)
        assert np.array_equal(dataset[index]["patches"][:, 0].numpy(), expected)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("positive_digit", 10),
        ("positive_digit", -1),
        ("mean_bag_size", 0),
        ("std_bag_size", -0.5),
        ("num_train_bags", 0),
        ("num_val_bags", 0),
        ("num_test_bags", -3),
        ("image_size", 7),
        ("num_workers", -1),
    ],
)
def test_bad_parameters_name_the_parameter(name: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"^{name}: expected"):
        DigitBagsDataModule(**{name: value})


def test_impossible_balance_is_reported() -> None:
    dm = DigitBagsDataModule(mean_bag_size=80, image_size=8)
    with pytest.raises(ValueError, match="^balanced: negative bags are too rare"):
        dm.setup()
    assert _module(mean_bag_size=80, balanced=False, image_size=8, num_test_bags=10).dataset("val").labels.all()


def test_unknown_split_is_rejected(default_dm: DigitBagsDataModule) -> None:
    with pytest.raises(ValueError, match="split must be one of"):
        default_dm.dataset("predict")


def test_configurable_from_yaml_like_lightning_cli() -> None:
    """LightningCLI builds the data module through jsonargparse, which checks values against the signature."""
    from jsonargparse import ArgumentError, ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(DigitBagsDataModule, "data")
    config = parser.parse_args(["--data.positive_digit=3", "--data.balanced=false", "--data.image_size=32"])
    dm = DigitBagsDataModule(**config.data)
    assert (dm.hparams.positive_digit, dm.hparams.balanced, dm.hparams.image_size) == (3, False, 32)
    assert dm.num_classes == 2 and dm.classes == ["negative", "positive"]
    with pytest.raises(ArgumentError, match="positive_digit"):
        parser.parse_args(["--data.positive_digit=3.5"])
