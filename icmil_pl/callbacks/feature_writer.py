"""Feature extraction as a `predict` stage: a writer callback streams embeddings into the per-slide zarr cache.

`python -m icmil_pl predict -c experiments/extract.yaml` and the ICMIL loop both run `trainer.predict(PatchEmbedder,
SlidePatchDataModule)` with this callback: it picks the cache folder from the embedder's fingerprint and the patch
geometry, tells the data module to skip slides already there, and commits each slide atomically once complete. The
same command run several times at once (a job array) fills one cache together: each slide is claimed before it is
embedded (`data_modules.datasets.claims`), so each is embedded once.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from tqdm.auto import tqdm

import icmil_pl
from data_modules.datasets.claims import HOST, SlideClaims
from data_modules.datasets.feature_cache import FeatureCache, FeatureDtype, SlideFeatureWriter
from data_modules.datasets.patch_store import PatchStore, PatchWriter
from data_modules.datasets.patches import SlidePatchDataModule
from data_modules.slides import Resample
from data_modules.slides.tiling import SlidePatches, TilingConfig

from ..encoders import PatchEmbedder
from .outputs import report_skipped

__all__ = ["FeatureWriter", "cache_key", "extract_features", "extraction_summary"]


def cache_key(embedder: PatchEmbedder, tiling: TilingConfig) -> str:
    """Embedder fingerprint + patch geometry: the same embedder at another magnification is another cache."""
    geometry = json.dumps({"mpp": tiling.mpp, "patch_size": tiling.patch_size}, sort_keys=True)
    return f"{embedder.fingerprint()}-{hashlib.blake2b(geometry.encode(), digest_size=4).hexdigest()}"


def provenance(embedder: PatchEmbedder, tiling: TilingConfig) -> dict:
    """What the cache records of how its features were made: the embedder's `provenance` (preset, hub id and revision,
    output mode, weights source and hash, fine-tuning) and the patch geometry."""
    return {
        **embedder.provenance(),
        "patch_size_px": tiling.patch_size,
        "patch_size_um": tiling.patch_size * tiling.mpp,
        "mpp": tiling.mpp,
        "tissue_threshold": tiling.tissue_threshold,
        "code_version": icmil_pl.__version__,
    }


class FeatureWriter(pl.Callback):
    """Writes each slide's features to `<cache_root>/<cache key>/<slide>.zarr` as its patches are embedded.

    With the data's `on_slide_error: skip`, a slide with a patch that cannot be read is dropped whole (its writer
    aborted, nothing half written) and recorded in `skipped` with the reader's error, as are the slides that could not
    be tiled; the cache's manifest keeps them and the end of the run lists them.

    Extractions running at once on one cache claim each slide before embedding it and leave the slides others hold;
    `claim_timeout`: seconds without a heartbeat after which a claim from another host is taken to be dead (a dead
    process's claim on this host is taken over at once). A heartbeat comes with every batch, so the timeout bounds
    the time of one batch, not of one slide.

    Where the data names a patch store (`SlidePatchDataModule.patch_store`), each slide's patches are stored decoded
    as they are embedded and committed with its features, so that coupling, end-to-end and re-extraction epochs read
    them from there instead of decoding the slide again.
    """

    def __init__(
        self, cache_root: str = "runs/features", dtype: FeatureDtype = "float16", claim_timeout: float = 600.0
    ) -> None:
        self.cache_root, self.dtype, self.claim_timeout = Path(cache_root), dtype, claim_timeout
        if not claim_timeout > 0:
            raise ValueError(f"FeatureWriter.claim_timeout: expected seconds > 0, got {claim_timeout!r}")
        self.cache: FeatureCache | None = None
        self.claims: SlideClaims | None = None
        self._provenance: dict = {}
        self._sizes: dict[str, int] = {}
        self._sources: dict[str, str] = {}  # slide id -> SlidePatches.digest of what its features are computed from
        self._open: dict[str, SlideFeatureWriter] = {}
        self._storing: dict[str, PatchWriter] = {}  # the decoded patches of open slides, where a patch store is set
        self._entries: dict[str, SlidePatches] = {}  # slide id -> its grid and patch store, of the slides to embed
        self._resample: Resample = "bilinear"
        self._began: dict[str, float] = {}  # slide id -> when its first features arrived
        self._done: dict[str, float] = {}  # slide id -> seconds from its first features to its commit
        self._cached = 0  # slides whose features were there before this run
        self._clock = time.perf_counter()
        self._bar: tqdm | None = None
        self.skipped: dict[str, str] = {}  # slide id -> why it has no features
        self._warning_filters: list | None = None  # the filters to restore after a run with nothing to embed

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        data = trainer.datamodule
        if not isinstance(pl_module, PatchEmbedder) or not isinstance(data, SlidePatchDataModule):
            raise ValueError("FeatureWriter needs model: PatchEmbedder and data: SlidePatchDataModule")
        pl_module.check_tiling(data.tiling.mpp, data.tiling.patch_size)
        self.cache = FeatureCache(self.cache_root / cache_key(pl_module, data.tiling))
        self._provenance = provenance(pl_module, data.tiling)
        if trainer.is_global_zero:
            self.cache.write_manifest(self._provenance)
            self.cache.remove_stale_temporaries()
        data.setup()
        self.skipped = dict(data.skipped)
        self._sources = {s.slide_id: s.digest() for s in data.slide_patches}
        cached = {slide_id for slide_id, source in self._sources.items() if self.cache.has(slide_id, source)}
        data.exclude(cached)
        self.claims = data.claims = SlideClaims(self.cache.path / ".claims", self.claim_timeout, self._complete)
        self._cached, self._done, self._clock = len(cached), {}, time.perf_counter()
        todo = data.dataset()
        self._sizes = {slide_id: end - start for slide_id, start, end in todo.slide_ranges()}
        self._entries, self._resample = {entry.slide_id: entry for entry in todo.slides}, todo.resample
        if not self._sizes:  # a complete cache: Lightning runs no predict loop, and its warning is expected
            self._warning_filters = warnings.filters[:]
            warnings.filterwarnings("ignore", message="Total length of `DataLoader` across ranks is zero")
            self._report(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._warning_filters is not None:
            warnings.filters[:] = self._warning_filters
            self._warning_filters = None

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sampler = getattr(trainer.predict_dataloaders, "sampler", None)  # under DDP: this process's share
        total = getattr(sampler, "num_slides", len(self._sizes))
        quiet = None if trainer.is_global_zero else True  # None: no bar where the output is not a terminal (logs)
        self._bar = tqdm(total=total, desc="extracting", unit="slide", disable=quiet)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        features = outputs.detach().float().cpu().numpy()
        coords = batch["coords"].cpu().numpy()
        ids = list(batch["slide_id"])
        errors = batch.get("error")  # only with on_slide_error: skip; "" for every patch that was read
        start = 0
        while start < len(ids):  # a batch may span the end of one slide and the start of the next
            end = start
            while end < len(ids) and ids[end] == ids[start]:
                end += 1
            slide = ids[start]
            failure = next((e for e in errors[start:end] if e), None) if errors is not None else None
            if failure is not None and slide not in self.skipped:
                self._skip(slide, failure)
            elif slide not in self.skipped:
                writer = self._open.get(slide) or self._start(slide, features.shape[1])
                writer.append(features[start:end], coords[start:end])
                if slide in self._storing:  # the patches as the embedder got them, decoded once for later epochs
                    self._storing[slide].append(batch["image"][start:end].cpu().numpy())
                if writer.complete:
                    writer.commit()
                    if slide in self._storing:
                        self._storing.pop(slide).commit()
                    self.claims.release(slide)
                    del self._open[slide]
                    self._done[slide] = time.perf_counter() - self._began.pop(slide)
                    if self._bar is not None:
                        self._bar.update()
            start = end
        self.claims.refresh()

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        unfinished = sorted(self._open)
        self._abort()
        if unfinished:
            raise RuntimeError(f"feature extraction ended with incomplete slides: {unfinished}")
        others = {s for s in self.claims.left_to_others if s not in self._done}
        taken = dict(self.claims.taken_over)
        if trainer.world_size > 1:  # each process skipped and embedded slides of its own share
            parts: list[tuple] = [() for _ in range(trainer.world_size)]
            torch.distributed.all_gather_object(parts, (self.skipped, self._done, others, taken))
            self.skipped = {k: v for part in parts for k, v in part[0].items()}
            self._done = {k: v for part in parts for k, v in part[1].items()}
            others = {s for part in parts for s in part[2]}
            taken = {k: v for part in parts for k, v in part[3].items()}
        self._report(trainer, others, taken)

    def _report(self, trainer: pl.Trainer, others: set[str] = frozenset(), taken: dict | None = None) -> None:
        if trainer.is_global_zero:
            self.cache.record_skipped(self.skipped)
            summary = extraction_summary(self._done, self._sizes, self._cached, self.skipped, self._clock, others)
            record = {k: v for k, v in summary.items() if k != "line"}
            started = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - summary["seconds"]))
            record.update(host=HOST, pid=os.getpid(), started=started, embedded=sorted(self._done))
            record.update(taken_over=taken or {})
            self.cache.record_extraction(record)
            print(f"features: {self.cache.path}")
            print(summary["line"])
            for slide, holder in sorted((taken or {}).items()):
                print(f"took over {slide}: its claim was held by {holder}, which is gone")
            report_skipped(self.skipped)

    def _complete(self, slide_id: str) -> bool:
        """Whether another process finished `slide_id` since this one looked at the cache."""
        return self.cache.has(slide_id, self._sources.get(slide_id))

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._abort()

    def _skip(self, slide_id: str, error: str) -> None:
        for writer in (self._open.pop(slide_id, None), self._storing.pop(slide_id, None)):
            if writer is not None:
                writer.abort()
        self.claims.release(slide_id)
        self.skipped[slide_id] = error
        if self._bar is not None:
            self._bar.update()

    def _start(self, slide_id: str, dim: int) -> SlideFeatureWriter:
        entry = self._entries[slide_id]
        attrs = {
            **self._provenance,
            "slide_id": slide_id,
            "num_patches": self._sizes[slide_id],
            "level0_patch_size": entry.grid.level0_size,
            "source": self._sources[slide_id],
            "embedded_by": {"host": HOST, "pid": os.getpid()},
        }
        writer = self._open[slide_id] = self.cache.writer(slide_id, self._sizes[slide_id], dim, self.dtype, attrs)
        storing = PatchStore(entry.patch_store).writer(entry, self._resample) if entry.patch_store else None
        if storing is not None:
            self._storing[slide_id] = storing
        self._began[slide_id] = time.perf_counter()
        return writer

    def _abort(self) -> None:
        for writer in [*self._open.values(), *self._storing.values()]:
            writer.abort()
        self._open.clear()
        self._storing.clear()
        if self.claims is not None:
            self.claims.release_all()
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def extraction_summary(
    done: dict[str, float],
    sizes: dict[str, int],
    cached: int,
    skipped: dict[str, str],
    began: float,
    others: set[str] = frozenset(),
) -> dict:
    """What an extraction did and how fast, as printed at its end and kept in the cache's manifest: slides embedded,
    already cached, skipped and left to other processes at work on the same cache, patches, patches per second (of
    the wall time since it began) and seconds per slide (median and slowest), the figure users compare across
    versions."""
    seconds = time.perf_counter() - began
    patches = sum(sizes.get(slide, 0) for slide in done)
    per_slide = sorted(done.values())
    slowest = max(done, key=done.get) if done else None
    summary = {
        "slides_embedded": len(done),
        "slides_cached": cached,
        "slides_skipped": len(skipped),
        "slides_left_to_others": len(others),
        "patches": patches,
        "seconds": round(seconds, 3),
        "patches_per_second": round(patches / seconds, 2) if seconds > 0 else None,
        "seconds_per_slide_median": round(per_slide[len(per_slide) // 2], 3) if per_slide else None,
        "seconds_per_slide_slowest": round(per_slide[-1], 3) if per_slide else None,
        "slowest_slide": slowest,
    }
    rate = f"{summary['patches_per_second']:.1f} patches/s" if summary["patches_per_second"] is not None else "-"
    timing = (
        f"; per slide {summary['seconds_per_slide_median']:.2f} s median, {summary['seconds_per_slide_slowest']:.2f} "
        f"s slowest ({slowest})"
        if per_slide
        else ""
    )
    left = f", {len(others)} left to other processes" if others else ""
    summary["line"] = (
        f"extraction: {len(done)} slides embedded, {cached} already cached, {len(skipped)} skipped{left}; {patches} "
        f"patches in {seconds:.1f} s, {rate}{timing}"
    )
    return summary


def extract_features(
    embedder: PatchEmbedder,
    data: SlidePatchDataModule,
    cache_root: str = "runs/features",
    *,
    dtype: FeatureDtype = "float16",
    trainer_kwargs: dict | None = None,
    claim_timeout: float = 600.0,
) -> FeatureCache:
    """Embed every patch of `data` not already cached under this embedder's key (nor claimed by another extraction
    at work on the same cache); returns the cache."""
    writer = FeatureWriter(cache_root, dtype, claim_timeout)
    kwargs = {"logger": False, "enable_checkpointing": False, **(trainer_kwargs or {})}
    kwargs["use_distributed_sampler"] = False  # the data module shards whole slides across processes itself
    kwargs["callbacks"] = [*kwargs.get("callbacks", []), writer]
    pl.Trainer(**kwargs).predict(embedder, datamodule=data, return_predictions=False)
    return writer.cache
