"""scripts/reading_eval.py's position bands (the script itself runs real models: GPU sessions, CPU pilots)."""

import importlib.util
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "reading_eval.py"
spec = importlib.util.spec_from_file_location("reading_eval", SCRIPT)
reading_eval = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reading_eval)


def test_bands_end_at_the_document_even_where_the_runs_trained_on_rows_as_long():
    # 8192-token documents: 8191 predicted positions; a run trained on 8192-token rows has no band past them
    assert reading_eval.position_edges(2568, 8192, 8192) == [0, 2568, 8191]
    assert reading_eval.position_edges(2568, 8192, 16384) == [0, 2568, 8192, 16383]
    assert reading_eval.position_edges(328, 1024, 2048) == [0, 328, 1024, 2047]
    loss = torch.arange(8191, dtype=torch.float32).repeat(2, 1)
    bands = reading_eval.band_means(loss, reading_eval.position_edges(2568, 8192, 8192))
    assert list(bands) == ["0-2568", "2568-8191"]
    assert bands["0-2568"] == [1283.5, 1283.5] and bands["2568-8191"] == [(2568 + 8190) / 2] * 2
