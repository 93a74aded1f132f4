import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sala.train.trainer import Trainer


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    from .tiny import tiny_recipe

    tr = Trainer(tiny_recipe(), tmp_path_factory.mktemp("one"), log=lambda *a: None)
    res = tr.run()
    return tr.student.state_dict(), [r["loss"] for r in res["history"]]


@pytest.mark.parametrize("parallel, stop", [("ddp", None), ("fsdp2", 3)])
def test_two_processes_match_one_process(single_process, tmp_path, parallel, stop):
    """2 processes (torchrun, gloo) give the 1-process result; the FSDP2 run is also interrupted mid-stage
    (sharded optimizer state and data position saved) and resumed."""
    worker = Path(__file__).parent / "ddp_worker.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker),
           str(tmp_path / "run"), parallel] + ([str(stop)] if stop else [])
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=150)
    assert run.returncode == 0, run.stderr[-4000:]
    r0 = load_file(str(tmp_path / "run" / "rank0.safetensors"))
    sd, losses_one = single_process
    assert set(r0) <= set(sd) and len(r0) >= len(sd) - 1  # (a tied LM head may appear once)
    if parallel == "ddp":  # replicas: both processes hold the same model
        r1 = load_file(str(tmp_path / "run" / "rank1.safetensors"))
        assert all(torch.equal(r0[k], r1[k]) for k in r0)
    for k in r0:
        torch.testing.assert_close(r0[k], sd[k], atol=1e-6, rtol=1e-5)  # = the full-batch update
    losses = [float(x) for x in (tmp_path / "run" / "losses0.txt").read_text().split()]
    assert len(losses) == len(losses_one) == 6
    for a, b in zip(losses, losses_one):
        assert abs(a - b) <= 1e-6 * max(1.0, abs(b))
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
