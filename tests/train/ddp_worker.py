"""torchrun worker for test_distributed: trains the tiny recipe data-parallel and saves each rank's weights."""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from tiny import tiny_recipe  # noqa: E402

from sala.train.trainer import Trainer  # noqa: E402

torch.set_num_threads(1)
out = Path(sys.argv[1])
tr = Trainer(tiny_recipe(), out, log=lambda *a: None)
res = tr.run()
sd = {k: v.detach().clone().contiguous() for k, v in tr.student.state_dict().items()}
save_file(sd, str(out / f"rank{tr.rank}.safetensors"))
(out / f"losses{tr.rank}.txt").write_text("\n".join(repr(r["loss"]) for r in res["history"]))
