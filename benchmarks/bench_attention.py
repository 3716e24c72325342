"""Side-by-side GPU benchmarks of the hybrid layer; the same measurements as `linearize bench`.

    python benchmarks/bench_attention.py --name h100 [--lengths 1024,...,131072] [--skip-decode] ...

See linearize.bench.kernels for what is measured; results land in benchmarks/results/<name>.json
(and .md), and benchmarks/README.md holds the table of the reference run.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

from linearize.bench.kernels import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
