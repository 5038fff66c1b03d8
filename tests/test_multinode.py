"""Two nodes on one machine: `num_nodes=2` with NODE_RANK 0 and 1 over loopback, as Slurm or torchrun start a job on
two machines. One end-to-end step, bags spread over the nodes or each bag's chunks split between them
(`shard_bags`), equals one process's step on the same two bags."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_end_to_end import _Data, _model, _one_step

HERE = Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["bags", "sharded"])
def test_a_two_node_step_equals_one_process_step(tmp_path, mode):
    port = str(_free_port())
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
    nodes = [
        subprocess.Popen(
            [sys.executable, str(HERE / "two_node_step.py"), str(tmp_path), mode],
            env={**env, "NODE_RANK": str(rank)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err[-2000:]
    single = _one_step(_model(chunk_size=4, bags_per_step=2), _Data(), tmp_path / "single").state_dict()
    for rank in (0, 1):
        after = torch.load(tmp_path / f"node{rank}.pt")
        assert max((single[k].float() - v.float()).abs().max().item() for k, v in after.items()) < 1e-5, rank
