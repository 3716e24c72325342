"""Issue 17: eval / generate refuse bad input up front with one line, keep finished modes, refuse placeholder
tokenizers."""

from __future__ import annotations

import json

import pytest

import linearize
from linearize.cli import main
from linearize.errors import ModelFileError
from linearize.evaluate.lm_eval_model import load_model
from lz_eval_helpers import DATA, tiny_llama
from tiny_models import tiny_model

pytestmark = pytest.mark.skipif(DATA is None, reason="benchmark data directory not found")


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("linearize ")]  # not loading progress bars
    assert "Traceback" not in err and len(errors) == 1, err
    return errors[0]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("models")
    tiny_llama(tokenizer, max_pos=256).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    conv = linearize.convert(tiny_llama(tokenizer, max_pos=256), linearize.HybridConfig(window=8))
    conv.save_pretrained(root / "conv")
    tokenizer.save_pretrained(root / "conv")
    return root / "base", root / "conv"


def test_unknown_component_modes_are_refused_before_loading(capsys):
    assert main(["eval", "--model", "/no/such/model", "--tasks", "piqa", "--components", "la_only,bogus"]) == 2
    assert "unknown mode(s) 'bogus'" in _one_line(capsys)


def test_evaluation_keeps_the_modes_that_finished(dirs, tmp_path, monkeypatch):
    from linearize.evaluate import harness

    real, calls = harness.evaluate, []

    def second_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(harness, "evaluate", second_fails)
    _, conv = dirs
    with pytest.raises(RuntimeError, match="simulated"):
        main(["eval", "--model", str(conv), "--tasks", "piqa", "--limit", "2", "--components", "hybrid,la_only",
              "--bootstrap", "0", "--device", "cpu", "--out", str(tmp_path)])
    assert list(json.loads((tmp_path / "eval.json").read_text())["runs"]) == ["hybrid"]


def test_generate_refuses_components_on_a_base_model(dirs, capsys):
    base, _ = dirs
    assert main(["generate", str(base), "hello", "--components", "la_only", "--device", "cpu"]) == 2
    assert "needs a converted model" in _one_line(capsys)


@pytest.mark.parametrize("layout", ["linearized", "old"])
def test_a_directory_without_a_usable_tokenizer_is_refused(tmp_path, capsys, layout):
    """A converted Gemma 3 directory without tokenizer files. Its own model_type has no tokenizer class, so
    transformers refuses; under the old layout (the base's model_type) it builds a 5-token placeholder from the
    config instead of failing, which must not be used either."""
    linearize.convert(tiny_model("gemma3")).save_pretrained(tmp_path)
    if layout == "old":
        config = json.loads((tmp_path / "config.json").read_text())
        config.update(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"])
        (tmp_path / "config.json").write_text(json.dumps(config))
    problem = r"tokenizer has \d+ tokens for a model of 128" if layout == "old" else "no usable tokenizer files"
    with pytest.raises(ModelFileError, match=problem):
        load_model(tmp_path, device="cpu")
    assert main(["generate", str(tmp_path), "hello", "--device", "cpu"]) == 2
    assert "copy the base model's tokenizer files" in _one_line(capsys)


def test_generate_says_which_decode_step_ran_and_its_speed(dirs, capsys):
    _, conv = dirs
    assert main(["generate", str(conv), "hello", "--max-new-tokens", "4", "--device", "cpu"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "tok/s" in last and "converted, hybrid" in last and "eager decode step (the model is on cpu" in last
