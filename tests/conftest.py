import os

import pytest
import torch

# Under pytest-xdist (scripts/test.sh runs one worker per core) each worker computes on one thread: the workers share
# the cores, and intra-op threads on top of them would oversubscribe the machine.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
