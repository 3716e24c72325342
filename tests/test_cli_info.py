import linearize
from linearize.cli import main
from linearize.commands.info import describe
from tiny_models import tiny_model


def test_describe_base_gemma_layout():
    text = describe(tiny_model("gemma3"), linearize.HybridConfig(window=64), 32768, converted=False)
    assert "1x full_attention, 2x sliding_attention" in text
    assert "head_dim 16" in text and "q/k norms" in text
    assert "3 of 3" in text and "constant in context" in text


def test_info_on_a_converted_directory(tmp_path, capsys):
    model = linearize.convert(tiny_model("llama"), linearize.HybridConfig(window=16, layers=[1]))
    model.save_pretrained(tmp_path)
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "status          converted" in out
    assert "1 of 2: [1]" in out and "last 16 keys" in out
    assert "unconverted full-attention layers [0] still grow" in out


def test_describe_a_conversion_of_the_global_layers_only_is_constant_in_context():
    text = describe(tiny_model("gemma3"), linearize.HybridConfig(window=64, layers="global"), 32768, converted=False)
    assert "1 of 3: [2]" in text
    assert "constant in context; 2 unconverted sliding-window layers on rings of 512 keys" in text


def test_info_unknown_model_is_a_clear_error(capsys):
    assert main(["info", "no-such-model"]) == 2
    assert "gemma3-270m" in capsys.readouterr().err
