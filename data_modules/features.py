"""Bags of cached patch features with slide labels: our zarr cache, or CLAM/TRIDENT-style `.h5` files users bring."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from .bag_data import BagDataModule
from .feature_cache import FeatureCache
from .splits import SlideLabel

__all__ = ["FeatureBagDataModule", "FeatureBagDataset", "read_bag", "resolve_features_dir"]


def read_bag(features_dir: Path, slide_id: str) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, D) float16 or float32 as stored, coords (N, 2)) from `<dir>/<id>.zarr` or `<dir>/<id>.h5`."""
    zarr_path, h5_path = features_dir / f"{slide_id}.zarr", features_dir / f"{slide_id}.h5"
    if zarr_path.is_dir():
        bag = FeatureCache(features_dir.parent, features_dir.name).read(slide_id)
        features, coords = bag.features[:], bag.coords
    elif h5_path.is_file():
        with h5py.File(h5_path, "r") as fh:
            if "features" not in fh:
                raise ValueError(f"{h5_path}: no `features` dataset (expected CLAM/TRIDENT layout: features, coords)")
            features = fh["features"][:]
            coords = fh["coords"][:] if "coords" in fh else np.zeros((len(features), 2), np.int32)
    else:
        raise ValueError(f"slide {slide_id!r}: no features in {features_dir} (expected {zarr_path.name} or {h5_path.name})")
    features = np.asarray(features)
    if features.dtype not in (np.float16, np.float32):  # half stays half: the model converts on its device
        features = features.astype(np.float32)
    return features.reshape(-1, features.shape[-1]), np.asarray(coords).reshape(-1, 2)


def resolve_features_dir(path: Path) -> Path:
    """`path` itself if it holds slide features, else its only cache subfolder (`runs/features` -> the one key)."""
    if not path.is_dir():
        raise ValueError(f"features folder {path} does not exist (run feature extraction first)")
    if any(path.glob("*.zarr")) or any(path.glob("*.h5")) or (path / "manifest.json").is_file():
        return path
    caches = sorted(p for p in path.iterdir() if (p / "manifest.json").is_file())
    if len(caches) == 1:
        return caches[0]
    if not caches:
        raise ValueError(f"features folder {path} holds no .zarr or .h5 slide features")
    names = ", ".join(p.name for p in caches)
    raise ValueError(f"features folder {path} holds {len(caches)} caches ({names}); name one: {path}/<key>")


class FeatureBagDataset(Dataset):
    """One item = one slide's whole bag: `{"features": (N, D), "label": int, "slide_id": str, "coords": (N, 2)}`
    (no "label" for an unlabelled slide)."""

    def __init__(self, features_dir: Path, slides: list[SlideLabel], class_index: dict[str, int]) -> None:
        self.features_dir, self.slides, self.class_index = features_dir, slides, class_index

    def __len__(self) -> int:
        return len(self.slides)

    def __getitem__(self, index: int) -> dict:
        row = self.slides[index]
        features, coords = read_bag(self.features_dir, row.slide_id)
        item = {"features": torch.from_numpy(features), "slide_id": row.slide_id,
                "coords": torch.from_numpy(coords.astype(np.int64))}  # fmt: skip
        if row.label is not None:
            item["label"] = torch.tensor(self.class_index[row.label])
        return item


class FeatureBagDataModule(BagDataModule):
    """Slide labels + a folder of per-slide features (our zarr cache or CLAM/TRIDENT `.h5`) -> bags of features.

    Every slide is checked before training starts (features exist, the bag is non-empty and finite, one feature
    dimension), so a bad cohort fails at once rather than mid-epoch. See `BagDataModule` for labels and splits.
    """

    def __init__(
        self,
        labels: str,
        features: str,
        classes: list[str] | None = None,
        folds: int = 5,
        fold: int = 0,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
        slides: str | None = None,
    ) -> None:
        super().__init__(labels, classes, folds, fold, val_fraction, seed, num_workers)
        self.features_dir = resolve_features_dir(Path(features))
        self.slides_dir = None if slides is None else Path(slides)  # only for pictures: heatmaps need the slides
        self.feature_dim: int | None = None

    def prepare_data(self) -> None:
        self._check_bags()

    def setup(self, stage: str | None = None) -> None:
        if self.feature_dim is None:
            self._check_bags()
        super().setup(stage)

    def bag_dataset(self, rows: list[SlideLabel]) -> FeatureBagDataset:
        return FeatureBagDataset(self.features_dir, rows, self.class_index)

    def feature_stats(self, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """Per-dimension mean and standard deviation over every instance of `split` (streamed, float64)."""
        total, total_sq, count = 0.0, 0.0, 0
        for row in self.split_rows(split):
            features = read_bag(self.features_dir, row.slide_id)[0].astype(np.float64)
            total, total_sq, count = total + features.sum(0), total_sq + (features**2).sum(0), count + len(features)
        mean = total / count
        std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
        return torch.from_numpy(mean).float(), torch.from_numpy(np.maximum(std, 1e-6)).float()

    def _check_bags(self) -> None:
        dims = set()
        for row in self.rows:
            try:
                features, _ = read_bag(self.features_dir, row.slide_id)
            except ValueError as exc:
                raise ValueError(f"{self.labels_path}: {exc}") from None
            if len(features) == 0:
                raise ValueError(f"{self.labels_path}: slide {row.slide_id!r} has an empty bag (no patches)")
            if not np.isfinite(features).all():
                raise ValueError(f"{self.features_dir}: slide {row.slide_id!r} has NaN or infinite features")
            dims.add(features.shape[1])
        if len(dims) > 1:
            raise ValueError(f"{self.features_dir}: slides have different feature dimensions {sorted(dims)}")
        self.feature_dim = dims.pop()
