"""Tiny random models and random token data for the training tests (no downloads)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

VOCAB = 128


def tiny_llama(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=0)
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def tiny_gemma3(seed: int = 0):
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
                           sliding_window=8, max_position_embeddings=1024, pad_token_id=0,
                           layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    return Gemma3ForCausalLM(cfg).eval()


def word_tokenizer():
    """A word-level tokenizer as large as the tiny models' vocabulary (saved with a converted model)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<pad>")


@dataclass
class RandomData:
    train: torch.Tensor
    val: torch.Tensor
    manifest: dict = field(default_factory=dict)


def random_data(rows: int = 16, val_rows: int = 4, seq_len: int = 32, seed: int = 0) -> RandomData:
    """Token rows with some structure (a repeated random pattern plus noise), so a LM can learn."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(1, VOCAB, (8,), generator=g)
    def make(n):
        reps = base.repeat(n, seq_len // 8 + 1)[:, :seq_len].clone()
        noise = torch.rand(n, seq_len, generator=g) < 0.3
        reps[noise] = torch.randint(1, VOCAB, (int(noise.sum()),), generator=g)
        return reps
    return RandomData(make(rows), make(val_rows), {"sources": ["random"], "seed": seed})


def tiny_recipe(name: str = "ssd", **sets) -> list[str]:
    """--set overrides that make a recipe tiny (window 8, a few steps)."""
    base = {
        "hybrid.window": 8, "hybrid.chunk_size": 8,
        "stage1.batch_size": 2, "stage1.grad_accum": 1, "stage1.epochs": 1, "stage1.max_steps": 4,
        "stage1.checkpoint_every": 2, "stage1.query_block": 8,
        "stage2.batch_size": 2, "stage2.grad_accum": 1, "stage2.epochs": 1, "stage2.max_steps": 4,
        "stage2.checkpoint_every": 2, "stage2.loss_chunk": 16, "stage2.early_stopping.eval_every": 2,
        "eval.batch_size": 2, "runtime.cpu": True, "runtime.show_progress": False,
    }
    base.update(sets)
    return [f"{k}={v}" for k, v in base.items()]
