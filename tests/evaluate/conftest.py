"""Fixtures of the evaluation tests (helpers live in lz_eval_helpers.py)."""

import pytest
from lz_eval_helpers import DATA, bpe_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    if DATA is None:
        pytest.skip("benchmark data directory not found")
    return bpe_tokenizer()
