"""Helpers of the evaluation tests: a small real BPE tokenizer, tiny random models, and the
hand-set "bag of tokens" model whose attention pattern decides its predictions exactly."""

from __future__ import annotations


import torch

from tiny_models import DATA, bpe_tokenizer  # noqa: F401  (re-exported for the evaluation tests)


def tiny_llama(tokenizer, seed: int = 0, max_pos: int = 1024, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_pos,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(cfg).eval()


# ----------------------------------------------------------------------------- bag-of-tokens model

WORDS = ["<bos>", "<eos>", "<pad>", "<unk>", "Question", "Answer", ":", ".", "?", "The", "pass", "key", "is",
         "Remember", "it", "What", "grass", "green", "sky", "blue", "sun", "yellow", "Here", "we", "go",
         "There", "and", "back", "again", "A", "B"] + [str(d) for d in range(10)] + [f"f{i}" for i in range(8)]


def word_tokenizer():
    """A word-level tokenizer over :data:`WORDS` (whitespace and punctuation split), BOS first."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def bag_model(vocab: int = len(WORDS), hidden: int = 64, out_scale: float = 50.0, head_scale: float = 20.0):
    """1-layer Llama whose next-token logits rank tokens by their share of the attended positions.

    Embeddings are one-hot, q = k = 0 (every attention logit is 0: softmax is uniform over whatever
    keys a mode allows, and with an exact-identity Hedgehog map the LA weights are the constant 2/d),
    v = o = identity (scaled), the MLP is zero and the LM head reads the hidden state back: the logit
    of token x is proportional to the attention weight on the positions holding x (plus the current
    token's own embedding). A token not attended gets exactly the same logit as any other absent one.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=8, num_hidden_layers=1,
                      num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=4096,
                      bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    eye = torch.eye(hidden)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(eye[:vocab])
        attn = model.model.layers[0].self_attn
        attn.q_proj.weight.zero_()
        attn.k_proj.weight.zero_()
        attn.v_proj.weight.copy_(eye)
        attn.o_proj.weight.copy_(out_scale * eye)
        mlp = model.model.layers[0].mlp
        for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            lin.weight.zero_()
        model.lm_head.weight.copy_(head_scale * eye[:vocab])
    return model
