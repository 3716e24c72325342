"""`linearize eval` on base and converted directories, lm-eval's HFLM on a converted model, the registered model."""

from __future__ import annotations

import json

import pytest
import torch

import linearize
from linearize.cli import main
from linearize.evaluate.lm_eval_model import converted_dir_info, load_model, register, set_components
from linearize.models.convert import hybrid_modules
from lz_eval_helpers import DATA, tiny_llama

pytestmark = pytest.mark.skipif(DATA is None, reason="benchmark data directory not found")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("models")
    base = tiny_llama(tokenizer, max_pos=256)
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    conv = linearize.convert(tiny_llama(tokenizer, max_pos=256), linearize.HybridConfig(window=8))
    conv.save_pretrained(root / "conv")
    tokenizer.save_pretrained(root / "conv")
    (root / "conv" / "summary.json").write_text(json.dumps({"model": str(root / "base"), "recipe": "ssd"}))
    return root / "base", root / "conv"


def test_converted_dir_info(dirs):
    base, conv = dirs
    assert converted_dir_info(base) is None
    info = converted_dir_info(conv)
    assert info["base"] == str(base) and info["recipe"] == "ssd" and info["hybrid"]["window"] == 8
    model, tok, info = load_model(conv, device="cpu")
    assert linearize.is_converted(model) and info["kind"] == "converted" and tok.pad_token is not None
    model, _, info = load_model(base, device="cpu", check=False, convert=True, window=4)
    assert info["kind"] == "converted_untrained" and info["hybrid"]["window"] == 4


def test_eval_cli_converted_per_component(dirs, tmp_path, capsys):
    _, conv = dirs
    out = tmp_path / "out"
    rc = main(["eval", "--model", str(conv), "--tasks", "piqa", "--limit", "4", "--components", "hybrid,none",
               "--batch-size", "4", "--bootstrap", "20", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    rec = json.loads((out / "eval.json").read_text())
    assert rec["kind"] == "eval" and list(rec["runs"]) == ["hybrid", "none"]
    assert rec["runs"]["hybrid"]["piqa"]["n"] == 4
    meta = rec["meta"]
    assert meta["kind"] == "converted" and meta["recipe"] == "ssd" and meta["seed"] == 1234 and "commit" in meta
    assert "| piqa | acc | 0 | 4 |" in (out / "eval.md").read_text()
    assert "hybrid (%, 95% CI)" in capsys.readouterr().out


def test_eval_cli_base_model_and_errors(dirs, tmp_path):
    base, _ = dirs
    assert main(["eval", str(base), "--tasks", "arc_easy", "--limit", "2", "--no-check", "--bootstrap", "0",
                 "--device", "cpu", "--out", str(tmp_path)]) == 0
    assert list(json.loads((tmp_path / "eval.json").read_text())["runs"]) == ["base"]
    # component modes need a converted model
    assert main(["eval", str(base), "--tasks", "piqa", "--limit", "2", "--no-check", "--components", "la_only"]) == 2


def test_hflm_on_converted_model(dirs):
    """lm-eval's own HFLM takes a converted model object as it is."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    _, conv = dirs
    model, tok, _ = load_model(conv, device="cpu")
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=2)
    reqs = [Instance("loglikelihood", {}, ("Question: how to boil water?\nAnswer:", " heat it"), 0),
            Instance("loglikelihood", {}, ("Question: how to boil water?\nAnswer:", " freeze it"), 1)]
    with linearize.components(model, "hybrid"):
        hybrid = [ll for ll, _ in lm.loglikelihood(reqs)]
    with linearize.components(model, "none"):
        none = [ll for ll, _ in lm.loglikelihood(reqs)]
    assert all(x < 0 for x in hybrid) and hybrid != none


def test_registered_model(dirs):
    from lm_eval.api.registry import get_model

    _, conv = dirs
    cls = register()
    assert get_model("linearize") is cls
    lm = cls.create_from_arg_string(f"pretrained={conv},components=la_only,batch_size=2,device=cpu")
    modes = {m.mode for m in hybrid_modules(lm.model)}
    assert modes == {"la_only"} and lm.linearize_info["components"] == "la_only"
    from lm_eval.api.instance import Instance

    (ll, _), = lm.loglikelihood([Instance("loglikelihood", {}, ("The sky is", " blue"), 0)])
    with torch.no_grad():
        set_components(lm.model, "hybrid")
    (ll2, _), = lm.loglikelihood([Instance("loglikelihood", {}, ("The sky is", " blue"), 0)])
    assert ll != ll2


def test_dtype_auto_is_bf16_only_where_the_device_computes_it_natively(monkeypatch):
    import torch

    from linearize.commands import eval as eval_cmd

    assert eval_cmd.torch_dtype("float16", "cpu") is torch.float16
    monkeypatch.setattr(eval_cmd, "_cpu_has_native_bf16", lambda: True)
    assert eval_cmd.torch_dtype("auto", "cpu") is torch.bfloat16
    monkeypatch.setattr(eval_cmd, "_cpu_has_native_bf16", lambda: False)
    assert eval_cmd.torch_dtype("auto", "cpu") is torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert eval_cmd.torch_dtype("auto", "cuda:0") is torch.float32


def _cli_loglikelihoods(out_dir) -> list[float]:
    (samples,) = out_dir.rglob("samples_lz_piqa_*.jsonl")
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    return [float(r[0][0]) for row in sorted(rows, key=lambda r: r["doc_id"]) for r in row["resps"]]


def test_lm_eval_cli_runs_converted_models(dirs, tmp_path):
    """`linearize lm-eval` is lm-eval's own CLI: the `linearize` model with components, and `hf` on a converted
    directory (the Auto classes give the hybrid, not the base)."""
    base, conv = dirs
    common = ["--tasks", "lz_piqa", "--limit", "3", "--device", "cpu", "--log_samples"]
    runs = {"linearize": ("linearize", f"pretrained={conv},components=hybrid"),
            "la_only": ("linearize", f"pretrained={conv},components=la_only"),
            "hf": ("hf", f"pretrained={conv}"), "base": ("hf", f"pretrained={base}")}
    got = {}
    for name, (model, args) in runs.items():
        assert main(["lm-eval", "--model", model, "--model_args", args, "--output_path", str(tmp_path / name), *common]) == 0
        got[name] = _cli_loglikelihoods(tmp_path / name)
    torch.testing.assert_close(torch.tensor(got["hf"]), torch.tensor(got["linearize"]), rtol=1e-5, atol=1e-5)
    assert got["la_only"] != got["linearize"] and got["base"] != got["linearize"]


def test_hybrid_overrides_split_at_commas_before_a_field():
    from linearize.commands.eval import hybrid_overrides

    assert hybrid_overrides(["memory_select=query,sparse_memory=256", "window=64"]) == {
        "memory_select": "query", "sparse_memory": 256, "window": 64}


def test_hybrid_overrides_are_typed_and_checked(dirs, capsys):
    from linearize.commands.eval import hybrid_overrides
    from linearize.errors import LinearizeError

    assert hybrid_overrides(["window=512", "placement=overlap", "gamma_trainable=false"]) == {
        "window": 512, "placement": "overlap", "gamma_trainable": False}
    for bad in (["window=abc"], ["windw=5"], ["window"]):
        with pytest.raises(LinearizeError):
            hybrid_overrides(bad)
    base, conv = dirs
    assert main(["eval", str(base), "--tasks", "piqa", "--limit", "2", "--hybrid", "window=8"]) == 2
    assert "need a converted model" in capsys.readouterr().err
