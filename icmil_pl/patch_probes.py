"""Patch-level measures of ICMIL runs on a cohort with ground truth (`data_modules.annotations`: the synthetic
cohort's tumour masks, or a real cohort's annotations).

Slide AUROC on a few dozen test slides is a coarse instrument; every test slide holds hundreds of patches with known
truth. Per iteration i of a finished run: (a) `probe_auroc`, how linearly separable tumour patches are in E_i's
features (logistic regression fitted on the training slides' patches, scored on the test slides' patches), and (b)
`instance_auroc`, how well the bag classifier trained on those features, applied per patch (ICMIL's teacher,
`Aggregator.instance_logits`), ranks the test slides' tumour patches above the rest.
"""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from data_modules.annotations import Annotations, locate_annotations, read_annotations
from data_modules.cohort import read_labels
from data_modules.datasets.feature_cache import FeatureCache

from .bag_classifier import BagClassifier
from .run_dir import RunDir, RunState, phase_key

__all__ = ["instance_auroc", "linear_probe_auroc", "linear_probe_scores", "probe_run"]


def linear_probe_auroc(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, seed: int = 0
) -> float:
    """Test AUROC of an L2-regularised logistic regression (C = 1, standardised features) fitted on the training
    patches: the standard linear probe of a representation."""
    return float(roc_auc_score(test_y, linear_probe_scores(train_x, train_y, test_x, seed)))


def linear_probe_scores(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, seed: int = 0) -> np.ndarray:
    """The linear probe's decision values on the test patches (`linear_probe_auroc` without the scoring)."""
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    probe.fit(train_x.astype(np.float32), train_y)
    return probe.decision_function(test_x.astype(np.float32))


@torch.no_grad()
def instance_auroc(bag: BagClassifier, features: np.ndarray, truth: np.ndarray) -> float:
    """AUROC of the bag classifier's per-patch logit margin of the last class (tumour) against the patch truth."""
    h = (torch.from_numpy(features).float() - bag.feature_mean) / bag.feature_std
    logits = bag.aggregator.eval().instance_logits(h).float()
    margin = logits[:, -1] - logits[:, :-1].logsumexp(-1)
    return float(roc_auc_score(truth, margin.numpy()))


def _patches(
    cache: FeatureCache, slide_ids: list[str], truths: dict[str, Annotations]
) -> tuple[np.ndarray, np.ndarray]:
    features, truth = [], []
    for slide_id in slide_ids:
        bag = cache.read(slide_id)
        side = float(bag.attrs["level0_patch_size"])
        features.append(np.asarray(bag.features, np.float32))
        truth.append(truths[slide_id].patch_truth(bag.coords, side))
    return np.concatenate(features), np.concatenate(truth)


def probe_run(
    run_dir: str | os.PathLike,
    bag: BagClassifier,
    labels: str | os.PathLike,
    annotations: str | os.PathLike | None = None,
) -> list[dict]:
    """Per iteration of the finished ICMIL run in `run_dir` (whose bag classifier is configured as `bag`), on the
    cohort of the labels CSV `labels` (its `annotations` column, else the `annotations` folder, give the truth):
    {"iteration", "probe_auroc", "instance_auroc", "test_patches", "test_tumour_patches"}, both AUROCs on the run's
    test slides."""
    run = RunDir(run_dir)
    state = RunState(run.state_path)
    splits = json.loads(run.splits_path.read_text())
    files = locate_annotations(read_labels(labels), labels, annotations)
    missing = sorted((set(splits["train"]) | set(splits["test"])) - set(files))
    if missing:
        raise ValueError(f"{labels}: no annotations for slides {missing[:3]} of {run.root}, which the probes need")
    truths = {slide_id: read_annotations(path) for slide_id, path in files.items()}
    results = []
    i = 0
    while phase_key(i, "bag") in state.done:
        cache = FeatureCache(state.output(phase_key(i, "embed")))
        train_x, train_y = _patches(cache, splits["train"], truths)
        test_x, test_y = _patches(cache, splits["test"], truths)
        head = copy.deepcopy(bag)
        head.load_state_dict(
            torch.load(state.output(phase_key(i, "bag")), map_location="cpu", weights_only=False)["state_dict"]
        )
        results.append(
            {
                "iteration": i,
                "probe_auroc": linear_probe_auroc(train_x, train_y, test_x, test_y),
                "instance_auroc": instance_auroc(head, test_x, test_y),
                "test_patches": len(test_y),
                "test_tumour_patches": int(test_y.sum()),
            }
        )
        i += 1
    return results
