"""One end-to-end step as one node of two (`num_nodes=2`, one process each), run by `test_multinode.py` as two
subprocesses over loopback: Lightning reads MASTER_ADDR, MASTER_PORT and NODE_RANK as it does on a cluster."""

from __future__ import annotations

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).parent))

from test_end_to_end import _Data, _model  # noqa: E402

if __name__ == "__main__":
    out = Path(sys.argv[1])
    sharded = sys.argv[2] == "sharded"  # every node steps through both bags, or each node through one
    model = _model(chunk_size=4, bags_per_step=2 if sharded else 1, shard_bags=sharded)
    pl.seed_everything(0)
    trainer = pl.Trainer(
        max_steps=1,
        accelerator="cpu",
        devices=1,
        num_nodes=2,
        strategy="ddp",
        use_distributed_sampler=not sharded,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=str(out),
    )
    trainer.fit(model, datamodule=_Data())
    torch.save(model.state_dict(), out / f"node{trainer.node_rank}.pt")
