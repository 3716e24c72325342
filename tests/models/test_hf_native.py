"""Converted checkpoints are Hugging Face models of their own: the Auto classes, pipeline and peft load the hybrid,
never silently the base; without linearize the checkpoint is refused; checkpoints of the old layout still load."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import linearize
from tiny_models import DATA, FAMILIES, bpe_tokenizer, tiny_model


def _saved(tmp_path, family="llama", **hybrid):
    model = linearize.convert(tiny_model(family), linearize.HybridConfig(window=4, **hybrid))
    with torch.no_grad():  # trained-looking feature maps, so a base-model load would differ
        for m in linearize.models.convert.hybrid_modules(model):
            m.feature_map_q.weight.normal_(0, 0.3)
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_from_pretrained_is_the_converted_model(tmp_path, family):
    model = _saved(tmp_path, family)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"].startswith("linearized_") and config["architectures"][0].startswith("Linearized")
    auto = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(1, 128, (2, 24))
    with torch.no_grad():
        expected = model(ids).logits
        torch.testing.assert_close(auto(ids).logits, expected, rtol=0, atol=0)
        torch.testing.assert_close(linearize.load(tmp_path)(ids).logits, expected, rtol=0, atol=0)
    assert linearize.is_converted(auto) and linearize.hybrid_config_of(auto).window == 4


def test_load_takes_from_pretrained_arguments(tmp_path):
    _saved(tmp_path)
    model = linearize.load(tmp_path, dtype=torch.bfloat16, device_map="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16 and not model.training


def test_without_linearize_the_checkpoint_is_refused_not_loaded_as_its_base(tmp_path):
    _saved(tmp_path)
    code = f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode != 0 and "linearized_llama" in run.stderr


def test_checkpoint_of_the_old_layout_still_loads(tmp_path):
    """Before this change a converted config kept the base's model_type and architectures."""
    model = _saved(tmp_path, "gemma3")
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    ids = torch.randint(1, 128, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(linearize.load(tmp_path)(ids).logits, model(ids).logits, rtol=0, atol=0)


@pytest.mark.skipif(DATA is None, reason="benchmark data directory not found")
def test_pipeline_and_peft_load_the_hybrid(tmp_path):
    from peft import AutoPeftModelForCausalLM, LoraConfig, get_peft_model
    from transformers import pipeline

    tokenizer = bpe_tokenizer()
    model = linearize.convert(tiny_model("qwen2", vocab_size=len(tokenizer)), linearize.HybridConfig(window=4))
    model.save_pretrained(tmp_path / "conv")
    tokenizer.save_pretrained(tmp_path / "conv")
    prompt = "To boil water, put a pot"
    inputs = tokenizer(prompt, return_tensors="pt")
    ids = inputs.input_ids
    expected = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    gen = pipeline("text-generation", model=str(tmp_path / "conv"), device="cpu")
    assert linearize.is_converted(gen.model)
    text = gen(prompt, max_new_tokens=12, do_sample=False, return_full_text=True)[0]["generated_text"]
    assert text == tokenizer.decode(expected[0], skip_special_tokens=True)
    # a LoRA adapter trained on the converted checkpoint comes back on top of the hybrid
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "conv")
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM"))
    lora.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        want = lora(ids).logits
        back = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
        assert linearize.is_converted(back)
        torch.testing.assert_close(back(ids).logits, want, rtol=1e-6, atol=1e-6)
