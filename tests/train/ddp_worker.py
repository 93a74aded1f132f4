"""torchrun worker for test_distributed: trains the tiny recipe with 2 processes and saves the weights.

argv: out_dir parallel(ddp|fsdp2) [stop_after]: with stop_after the run is interrupted there and
resumed by a fresh Trainer in the same process group.
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from tiny import tiny_recipe  # noqa: E402

from sala.train import distributed as D  # noqa: E402
from sala.train.trainer import Trainer  # noqa: E402

torch.set_num_threads(1)
out, parallel = Path(sys.argv[1]), sys.argv[2]
stop = int(sys.argv[3]) if len(sys.argv) > 3 else None
rec = tiny_recipe(parallel=parallel)
history = []
if stop:
    history += Trainer(rec, out, log=lambda *a: None).run(stop_after=stop)["history"]
tr = Trainer(rec, out, log=lambda *a: None)
history += tr.run()["history"]
sd = D.full_model_state(tr.student, tr.sharded)  # FSDP2: gathered on rank 0 only
assert tr.sharded == (parallel == "fsdp2") and tr.world == 2
if sd:
    save_file({k: v.detach().clone().contiguous() for k, v in sd.items()}, str(out / f"rank{tr.rank}.safetensors"))
(out / f"losses{tr.rank}.txt").write_text("\n".join(repr(r["loss"]) for r in history))
D.shutdown()
