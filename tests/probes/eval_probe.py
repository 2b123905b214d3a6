"""Evaluates a checkpoint on one split under any world size and prints the metrics as JSON (rank 0).

Used by the tests to show that evaluation is exact whatever the world size.
    torchrun --nproc_per_node=3 tests/probes/eval_probe.py CKPT SPLIT
"""

import json
import sys

import torch

from bfly.core import checkpoint, distributed
from bfly.core.config import from_dict
from bfly.core.data.inputs import build_eval_input
from bfly.core.data.metadata import load_metadata
from bfly.core.engine import evaluate
from bfly.core.env import dist_env
from bfly.core.models import build_model

path, split = sys.argv[1], sys.argv[2]
env = dist_env()
device = torch.device("cpu")
distributed.init(env, device, "gloo", 60)
state = checkpoint.load(path)
cfg = from_dict(state["config"])
meta = load_metadata(cfg.data.root, splits=[split])
model = build_model(state["arch"], state["num_classes"])
model.load_state_dict(state["model"])
batches = build_eval_input(cfg, meta, split, env.rank, env.world_size, 7, device).batches()
m = evaluate(model, batches, meta.num_classes, device, None)
if env.is_main:
    print(
        json.dumps(
            {
                "count": m["count"],
                "top1": m["top1"],
                "top5": m["top5"],
                "loss": m["loss"],
                "per_class": m["per_class"],
                "confusion": m["confusion"].tolist(),
            }
        )
    )
distributed.shutdown()
