"""End-to-end MIL: embedder and aggregator trained together from slide labels, one whole bag per step.

Three ways to pay for a bag, comparable from one config:
- `chunk_size: int`: exact gradient of the whole bag in bounded memory (`chunked.bag_backward`);
- `chunk_size: null`: the plain full-bag forward/backward (the baseline; memory grows with the bag);
- `max_instances: k`: train on k random patches of the bag per step (Koriakina et al.), cheap but approximate.

`head: <bag classifier checkpoint>` warm-starts the aggregator from a two-stage model (its weights and its feature
standardisation; iteration 0 of an ICMIL run), so that end to end starts where that model ended, with the embedder its
features came from (`embedder.init_args.weights: <run>/iter0/embedder.pt`, or `embedder_from: <slide model
checkpoint>`). `trains` picks what learns: both, the aggregator alone on the frozen embedder's features (a two-stage
model, features computed on the fly), or the embedder alone through the frozen aggregator (ICMIL's exact coupling).
`stain_jitter` augments every training patch (`data_modules.datasets.augment.StainJitter`), alike in both passes of
the chunked backward.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Literal

import torch
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from data_modules.datasets.augment import StainedBag, StainJitter
from data_modules.io import check, check_choice

from .aggregators import Aggregator
from .callbacks.figure_writer import FigureWriter
from .chunked import Bag, bag_backward, bag_backward_sharded, embed_chunked
from .encoders import PatchEmbedder
from .slide_task import ClassNames, Scheduler, SlideTask
from .tasks import Task

__all__ = ["EndToEndMIL"]


# the settings a step reads (`EndToEndMIL.cfg`), as named in `__init__`
_SETTINGS = (
    "chunk_size",
    "max_instances",
    "bags_per_step",
    "lr",
    "embedder_lr",
    "weight_decay",
    "scheduler",
    "eval_chunk_size",
    "trains",
    "shard_bags",
)


class EndToEndMIL(SlideTask):
    """Manual optimization over whole bags: `{"patches": (N, C, H, W) tensor or lazy bag, "label", "slide_id"}`.

    Gradients accumulate over `bags_per_step` bags (the loss of each is divided by it, so a step follows the mean
    loss). Under DDP nothing is synchronised during the many backward passes of a bag; the gradients are averaged
    across processes once, right before each optimizer step. With `shard_bags`, every process steps through the same
    bags instead and splits each bag's chunks (`chunked.bag_backward_sharded`): one slide's exact gradient over
    several GPUs, one step equal to a single process's (set `trainer.use_distributed_sampler: false`, so that every
    process is given every bag). Patches stay on the CPU; chunks move to the device as they are used.
    """

    def __init__(
        self,
        embedder: nn.Module,
        aggregator: Aggregator,
        chunk_size: int | None = 64,
        max_instances: int | None = None,
        bags_per_step: int = 1,
        lr: float = 1e-4,
        embedder_lr: float | None = None,
        weight_decay: float = 1e-4,
        scheduler: Scheduler = "none",
        gradient_clip_val: float | None = None,
        eval_chunk_size: int | None = None,
        aux_loss_weight: float = 1.0,
        class_names: ClassNames = None,
        figures: FigureWriter | bool = True,
        task: Task | None = None,
        stain_jitter: StainJitter | None = None,
        head: str | None = None,
        embedder_from: str | None = None,
        trains: Literal["both", "aggregator", "embedder"] = "both",
        shard_bags: bool = False,
    ) -> None:
        super().__init__(aggregator, aux_loss_weight, class_names, figures, task, gradient_clip_val)
        self.save_hyperparameters(ignore=["embedder", "aggregator", "figures", "task", "stain_jitter"])
        if self.task.needs_several_bags:
            raise ValueError(
                "task: a Cox loss compares bags, but end to end each bag's gradient is taken on its own; use "
                "Survival(loss='nll'), whose loss is per bag"
            )
        # settings live in plain attributes, copied from the hparams as given: LightningCLI rewrites the hparams of
        # modules nested in another module
        self.cfg = SimpleNamespace(**{name: self.hparams[name] for name in _SETTINGS}, stain_jitter=stain_jitter)
        check("chunk_size", chunk_size is None or chunk_size >= 1, "an int >= 1 or null (full bag)", chunk_size)
        whole = max_instances is None or max_instances >= 1
        check("max_instances", whole, "an int >= 1 or null (whole bag)", max_instances)
        check("bags_per_step", bags_per_step >= 1, "an int >= 1", bags_per_step)
        dim = getattr(embedder, "feature_dim", None)
        if dim is not None and dim != aggregator.in_dim:
            raise ValueError(f"aggregator in_dim={aggregator.in_dim}, but the embedder gives {dim}-d features")
        if hasattr(embedder, "start_finetune"):  # a PatchEmbedder: its `finetune` setting says what trains
            embedder.start_finetune()
        self.embedder = embedder
        self.register_buffer("feature_mean", torch.zeros(aggregator.in_dim))  # identity unless warm-started
        self.register_buffer("feature_std", torch.ones(aggregator.in_dim))
        if head is not None:
            self._warm_start(head)
        if embedder_from is not None:
            self._start_embedder(embedder_from)
        check_choice("trains", trains, ("both", "aggregator", "embedder"))
        frozen = {"aggregator": self.embedder, "embedder": self.aggregator}.get(trains)
        if frozen is not None:
            frozen.requires_grad_(False)

    def _start_embedder(self, path: str) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
            self.embedder.load_state_dict(
                {k.removeprefix("embedder."): v for k, v in state.items() if k.startswith("embedder.")}
            )
        except (OSError, KeyError, RuntimeError) as error:
            first = " ".join(str(error).split())[:200]
            raise ValueError(
                f"embedder_from: {path}: not a slide model checkpoint of this embedder ({first})"
            ) from None

    def _warm_start(self, path: str) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
            own = {k.removeprefix("aggregator."): v for k, v in state.items() if k.startswith("aggregator.")}
            self.aggregator.load_state_dict(own)
            self.feature_mean.copy_(state["feature_mean"])
            self.feature_std.copy_(state["feature_std"])
        except (OSError, KeyError, RuntimeError) as error:
            first = " ".join(str(error).split())[:200]
            raise ValueError(f"head: {path}: not a bag classifier checkpoint of this aggregator ({first})") from None

    def normalize(self, h: torch.Tensor) -> torch.Tensor:
        """Embeddings standardised as the warm-starting bag classifier's features were (identity otherwise)."""
        return (h - self.feature_mean) / self.feature_std

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Checkpoints from before the standardisation buffers: identity."""
        state = checkpoint["state_dict"]
        state.setdefault("feature_mean", torch.zeros_like(self.feature_mean))
        state.setdefault("feature_std", torch.ones_like(self.feature_std))
        super().on_load_checkpoint(checkpoint)

    # -- evaluation: chunked, no graph -------------------------------------------------------------------------------
    def embed(self, patches: Bag) -> torch.Tensor:
        chunk = self.cfg.eval_chunk_size or self.cfg.chunk_size or len(patches)
        return embed_chunked(self.embedder, patches, chunk)

    def instances(self, batch: dict) -> torch.Tensor:
        return self.normalize(self.embed(batch["patches"]))

    def transfer_batch_to_device(self, batch: dict, device: torch.device, dataloader_idx: int) -> dict:
        """Everything but the patches: a bag may be far larger than the accelerator's memory."""
        return {
            k: v if k == "patches" else super(EndToEndMIL, self).transfer_batch_to_device(v, device, dataloader_idx)
            for k, v in batch.items()
        }

    # -- training ----------------------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        cfg = self.cfg
        patches, label = self._sample(batch["patches"]), batch["label"]
        if cfg.stain_jitter is not None:  # drawn per bag, the same in both passes of the chunked backward
            patches = StainedBag(patches, cfg.stain_jitter, int(torch.randint(2**62, ())))
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        scale = scaler.scale if scaler is not None else None

        def bag_loss(h: torch.Tensor) -> torch.Tensor:
            return self.loss(self.aggregator(self.normalize(h)), label) / cfg.bags_per_step

        loss = None
        with self.unless_unreadable(batch):  # pass 1 reads every chunk before any backward: a skip leaves no gradient
            if cfg.trains == "aggregator":  # the embedder is frozen: its features need no graph
                self.embedder.eval()
                loss = bag_loss(self.embed(patches))
                (loss if scale is None else scale(loss)).backward()
                self.embedder.train()
                loss = loss.detach()
            elif cfg.chunk_size is None:
                loss = bag_loss(self.embedder(patches[0 : len(patches)].to(self.device, non_blocking=True)))
                (loss if scale is None else scale(loss)).backward()
                loss = loss.detach()
            elif self._sharded:
                seed = int(torch.randint(2**62, ()))  # the same on every process: their streams are
                loss = bag_backward_sharded(
                    self.embedder, bag_loss, patches, cfg.chunk_size, scale_loss=scale, chunk_seed=seed
                )
            else:
                loss = bag_backward(self.embedder, bag_loss, patches, cfg.chunk_size, scale_loss=scale)
            self.epoch_means.add("train/loss", loss * cfg.bags_per_step)

        if (batch_idx + 1) % cfg.bags_per_step == 0 or self.trainer.is_last_batch:
            optimizer = self.optimizers()
            self._average_gradients_across_processes()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return None if loss is None else loss * cfg.bags_per_step  # the bag's loss, for DivergenceGuard

    def configure_optimizers(self):
        cfg = self.cfg
        groups = [
            {"params": [p for p in self.aggregator.parameters() if p.requires_grad], "lr": cfg.lr},
            {"params": [p for p in self.embedder.parameters() if p.requires_grad], "lr": cfg.embedder_lr or cfg.lr},
        ]
        return self.adam([g for g in groups if g["params"]], cfg.lr, cfg.weight_decay, cfg.scheduler)

    def _sample(self, patches: Bag) -> Bag:
        """Within-bag sampling: `max_instances` random patches, in bag order (seeded by the global generator)."""
        k, n = self.cfg.max_instances, len(patches)
        if k is None or n <= k:
            return patches
        index = torch.randperm(n)[:k].sort().values
        return patches[index] if isinstance(patches, torch.Tensor) else patches.select(index.numpy())

    @property
    def _sharded(self) -> bool:
        """Whether each bag is split over the processes (`shard_bags` under DDP, chunked)."""
        return self.cfg.shard_bags and self.cfg.chunk_size is not None and self.trainer.world_size > 1

    @property
    def same_bags_on_every_process(self) -> bool:
        """What `EpochSeed` reads: sharded bags need one random stream on every process."""
        return self._sharded

    def setup(self, stage: str) -> None:
        super().setup(stage)
        tiling = getattr(self.trainer.datamodule, "tiling", None)
        if tiling is not None and isinstance(self.embedder, PatchEmbedder):
            self.embedder.check_tiling(tiling.mpp, tiling.patch_size)
        if self._sharded and self.trainer._accelerator_connector.use_distributed_sampler:
            raise ValueError(
                "shard_bags: every process must be given every bag; set trainer.use_distributed_sampler: false"
            )

    def _average_gradients_across_processes(self) -> None:
        """One all-reduce of every gradient as a single flat buffer: the only DDP communication of a step (none for
        sharded bags, whose gradients are already the whole step's on every process)."""
        if self.trainer.world_size <= 1 or self._sharded:
            return
        params = [p for p in self.parameters() if p.requires_grad]
        for p in params:  # a parameter unused on one rank (e.g. a DTFD branch) must still take part
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        flat = self.trainer.strategy.reduce(_flatten_dense_tensors(grads), reduce_op="mean")
        for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
            grad.copy_(synced)
