import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from sala.train.trainer import Trainer


def test_two_process_gloo_matches_one_process(recipe_factory, tmp_path):
    worker = Path(__file__).parent / "ddp_worker.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(worker), str(tmp_path / "ddp")], capture_output=True, text=True, env=env, timeout=240)
    assert run.returncode == 0, run.stderr[-4000:]
    r0, r1 = load_file(str(tmp_path / "ddp" / "rank0.safetensors")), load_file(str(tmp_path / "ddp" / "rank1.safetensors"))
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k  # the replicas stay identical
    single = Trainer(recipe_factory(), tmp_path / "one", log=lambda *a: None)
    res = single.run()
    sd = single.student.state_dict()
    for k in r0:  # each process saw half the rows of every batch; the update equals the full-batch one
        torch.testing.assert_close(r0[k], sd[k], atol=1e-6, rtol=1e-5)
    losses = [float(x) for x in (tmp_path / "ddp" / "losses0.txt").read_text().split()]
    assert len(losses) == len(res["history"]) == 6
    for a, b in zip(losses, [r["loss"] for r in res["history"]]):
        assert abs(a - b) <= 1e-6 * max(1.0, abs(b))
