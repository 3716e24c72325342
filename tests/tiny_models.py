"""Tiny random-weight models of every supported family, built from transformers config classes (no downloads)."""

from __future__ import annotations

import json

import torch
from transformers import (
    Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
    Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM,
)

from linearize.evaluate.harness import default_data_dir

try:
    DATA = default_data_dir()
except FileNotFoundError:  # pragma: no cover - data-less checkout
    DATA = None

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=0)

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": 4096}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),
    # Gemma 3's pattern: local sliding layers plus a global one, q/k norms, query_pre_attn_scalar, 1 KV head
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM, {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 512,
                                                     "num_hidden_layers": 3, "num_key_value_heads": 1,
                                                     "layer_types": ["sliding_attention", "sliding_attention", "full_attention"]}),
}


def tiny_model(family: str, seed: int = 0, **overrides):
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**COMMON, **extra, **overrides})).eval()
    # random biases too, so Qwen 2's q/k/v biases are exercised
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def converted_off_init(family: str, hybrid) -> "torch.nn.Module":
    """`tiny_model(family)` converted with `hybrid`, its state parameters (decay and beta projections, feature maps)
    moved off their initial values, so a test sees a state that decays and writes unevenly."""
    import linearize

    model = linearize.convert(tiny_model(family), hybrid)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "decay_proj" in name or "beta_proj" in name or "feature_map" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def assert_decode_bytes_are_the_cache(model, tokens: int = 50):
    """Prefill `tokens` random tokens into a cache: the decode bytes `linearize.models.memory` counts (fp32) are the
    bytes the cache holds. Returns the cache."""
    import linearize
    from transformers import DynamicCache

    from linearize.attention.cache import cache_nbytes
    from linearize.compat import cache_kwargs
    from linearize.models.memory import decode_state_bytes

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.randint(1, 128, (1, tokens)), **cache_kwargs(cache), use_cache=True)
    hybrid = linearize.hybrid_config_of(model)
    assert decode_state_bytes(model.config, tokens, dtype_bytes=4, hybrid=hybrid) == cache_nbytes(cache)
    return cache


def bpe_tokenizer(vocab_size: int = 512):
    """A byte-level BPE (BOS added like Llama/Gemma) trained on PIQA text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    with open(DATA / "piqa" / "validation.jsonl", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh][:600]
    texts = [r["goal"] + " " + r["sol1"] for r in rows]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<bos>", "<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def left_padded_batch(row: torch.Tensor, pad: int = 5, other: int = 17):
    """`row` (1, T) left-padded with `pad` zeros, stacked over a random unpadded row of length T + pad, and its mask."""
    batch = torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), row], 1), torch.randint(1, 128, (1, other))])
    mask = torch.ones_like(batch)
    mask[0, :pad] = 0
    return batch, mask


def assert_left_padding_invisible(model, mode: str, row: torch.Tensor):
    """The logits of `row` left-padded in a batch (`left_padded_batch`) equal those of the row alone, in component
    mode `mode`; returns (batch, mask) for further checks."""
    import linearize

    batch, mask = left_padded_batch(row)
    pad = batch.shape[1] - row.shape[1]
    with torch.no_grad(), linearize.components(model, mode):
        padded = model(batch, attention_mask=mask).logits[0, pad:]
        alone = model(row).logits[0]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)
    return batch, mask


def assert_decode_equals_forward(model, mode, ids, prompt=10, atol=1e-4):
    """Logits of a prompt prefill plus one-token cached steps equal the full forward in component `mode`; returns
    the cache."""
    from transformers import DynamicCache

    import linearize
    from linearize.compat import cache_kwargs

    with torch.no_grad(), linearize.components(model, mode):
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        first = model(ids[:, :prompt], **cache_kwargs(cache), use_cache=True).logits
        steps = [model(ids[:, i:i + 1], **cache_kwargs(cache), use_cache=True).logits for i in range(prompt, ids.shape[1])]
    torch.testing.assert_close(torch.cat([first] + steps, 1), full, atol=atol, rtol=1e-4)
    return cache


def assert_beam_scores_equal_forward(model, prompt_len: int = 9, new_tokens: int = 10):
    """Beam search (3 beams) reorders a converted model's decode state: each returned beam's score equals the sum of
    its tokens' log-probabilities under one full forward. min_new_tokens: no beam ends early at EOS (its padded
    tail would count in the full forward)."""
    prompt = torch.randint(1, 128, (1, prompt_len))
    out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=3,
                         num_return_sequences=3, length_penalty=0.0, return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        logp = torch.log_softmax(model(out.sequences).logits.float(), -1)[:, prompt_len - 1:-1]
    full = logp.gather(-1, out.sequences[:, prompt_len:, None]).squeeze(-1).sum(-1)
    torch.testing.assert_close(out.sequences_scores, full, atol=1e-4, rtol=1e-5)
