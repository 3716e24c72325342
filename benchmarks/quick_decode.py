"""The decode rows that answer "each model at the largest batch it fits" in about a minute of GPU time (Gemma-3-270M
shape, 32k context): `run_fair_decode` with no eager extra and no deferred-fold rows, the compiled and largest-batch
rows on; the JSON and Markdown are rewritten after every row, so a run cut off keeps what it measured. For a short
GPU window; `scripts/gpu_speed.sh` measures every row.

    PYTHONPATH=$PWD/src LINEARIZE_COMMIT=$(git rev-parse HEAD) python benchmarks/quick_decode.py OUT [--fold]

--fold adds the deferred-fold rows (converted_graph_fold16_compiled, at the base's batch and at the largest).
"""

import json
import os
import sys

import torch

from linearize.bench.decode import render_fair_markdown, run_fair_decode

out = sys.argv[1]
fold = "--fold" in sys.argv[2:]


def save(res):
    res = dict(res, device=torch.cuda.get_device_name(), commit=os.environ.get("LINEARIZE_COMMIT"), command="quick_decode.py (run_fair_decode: gemma3-270m, "
               f"32768, steps 16, no eager extra, {'fold rows' if fold else 'no fold rows'}, compiled and largest rows)")
    with open(f"{out}/quick_decode.json", "w") as f:
        json.dump(res, f, indent=1, default=str)
    with open(f"{out}/quick_decode.md", "w") as f:
        f.write("\n".join(render_fair_markdown(res)))


run_fair_decode(("gemma3-270m",), (32768,), steps=16, eager_extra_context=None, fold_rows=fold, compiled_rows=True,
                largest_rows=True, on_row=save, log=lambda s: print(s, flush=True))
