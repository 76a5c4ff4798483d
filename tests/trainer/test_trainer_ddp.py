"""DDP: 2 processes x batch 4 (gloo, CPU) follow the same loss trajectory as 1 process x batch 8."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process_with_double_batch(tmp_path):
    sys.path.insert(0, str(HERE))
    from ddp_worker import DDP_STEPS, result, run

    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(HERE / "ddp_worker.py"), str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ddp = json.loads((out / "ddp_result.json").read_text())

    single = result(run(str(tmp_path / "single"), batch_size=8))
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    assert len(ddp["losses"]) == DDP_STEPS
    torch.testing.assert_close(torch.tensor(ddp["losses"]), torch.tensor(single["losses"]), rtol=1e-5, atol=1e-6)
    assert ddp["lrs"] == single["lrs"]
    for name, values in single["weights"].items():
        torch.testing.assert_close(torch.tensor(ddp["weights"][name]), torch.tensor(values), rtol=1e-4, atol=1e-6)
    # rank 0 wrote the checkpoint, each rank its RNG state
    assert {"rng_state_0.pth", "rng_state_1.pth", "model.safetensors", "optimizer.pt"} <= set(ddp["files"])
    assert "rng_state.pth" in single["files"]
