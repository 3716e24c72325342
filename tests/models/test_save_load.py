import json

import pytest
import torch

import linearize
from linearize.errors import ModelFileError
from tiny_models import tiny_model


@pytest.mark.parametrize("family,settings", [
    ("gemma3", dict(window=4, combine="shared_norm", feature_map="hedgehog")),
    ("qwen2", dict(window=3, combine="mix", mix_gate="dynamic", feature_map="t2r", feature_size="half")),
    ("llama", dict(window=5, combine="mix", mix_gate="learned", placement="overlap", layers=[1])),
])
def test_round_trip_is_bit_exact(tmp_path, family, settings):
    model = linearize.convert(tiny_model(family), linearize.HybridConfig(**settings))
    with torch.no_grad():  # move trained-looking values away from their init
        for name, p in model.named_parameters():
            if "feature_map" in name or "logit" in name or ".gate." in name:
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["linearize"]
    assert saved["window"] == settings["window"]
    loaded = linearize.load(tmp_path)
    a, b = model.state_dict(), loaded.state_dict()
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(1, 128, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert linearize.hybrid_config_of(loaded).to_dict() == linearize.hybrid_config_of(model).to_dict()


def test_load_rejects_base_model_and_missing_dir(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "base")
    with pytest.raises(ModelFileError, match="not a converted model"):
        linearize.load(tmp_path / "base")
    with pytest.raises(ModelFileError, match="no config.json"):
        linearize.load(tmp_path / "nothing")
