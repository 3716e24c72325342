"""The continuation-only scorer gives lm-eval HFLM's loglikelihoods and greedy flags."""

import pytest
import torch

import linearize
from linearize.evaluate.lm_eval_model import continuation_scorer
from tiny_models import tiny_model


def _requests(tokenizer):
    from lm_eval.api.instance import Instance

    mmlu = "The following are questions.\nQ: What colour is grass?\nA. red\nB. green\nC. blue\nD. white\nAnswer:"
    pairs = [(mmlu, f" {c}") for c in "ABCD"]  # one-token answers sharing a context: one forward
    pairs += [("A long goal: to boil water, put a pot", " on the stove and heat it until it bubbles"),
              ("A long goal: to boil water, put a pot", " in the freezer"),
              ("Short", " x"), ("The sky is", " blue"), ("The sky is blue", " and green and blue again")]
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


@pytest.mark.parametrize("family,softcap", [("llama", None), ("gemma3", 3.0)])
@pytest.mark.parametrize("batch_size,max_length", [(1, 2048), (3, 2048), (4, 20)])
def test_matches_hflm(tokenizer, family, softcap, batch_size, max_length):
    from lm_eval.models.huggingface import HFLM

    overrides = {"vocab_size": len(tokenizer)}
    if softcap:
        overrides["final_logit_softcapping"] = softcap  # applied after the head: must still apply
    model = tiny_model(family, **overrides)
    if family == "gemma3":
        linearize.convert(model, linearize.HybridConfig(window=4))  # hybrid layers with padding-free batches
    reqs = _requests(tokenizer)
    # max_length 20 truncates the long prompts from the left, as HFLM does
    ref = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    ours = continuation_scorer()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    expected, got = ref.loglikelihood(reqs), ours.loglikelihood(reqs)
    assert [g for _, g in got] == [g for _, g in expected]
    torch.testing.assert_close(torch.tensor([ll for ll, _ in got]), torch.tensor([ll for ll, _ in expected]),
                               rtol=1e-5, atol=1e-4)
    assert len({ll for ll, _ in got[:4]}) == 4  # the shared-context answers are still scored apart


def test_head_runs_only_at_continuations(tokenizer):
    model = tiny_model("llama", vocab_size=len(tokenizer))
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda _m, _a, out: seen.append(out.shape[:-1].numel()))
    lm = continuation_scorer()(pretrained=model, tokenizer=tokenizer, batch_size=16)
    reqs = _requests(tokenizer)
    lm.loglikelihood(reqs)
    distinct = {(r.args[0], r.args[1]) if len(tokenizer(r.args[1], add_special_tokens=False)["input_ids"]) > 1
                else r.args[0] for r in reqs}
    conts = {}
    for r in reqs:
        key = (r.args[0], r.args[1]) if (r.args[0], r.args[1]) in distinct else r.args[0]
        conts[key] = max(conts.get(key, 0), len(tokenizer(r.args[1], add_special_tokens=False)["input_ids"]))
    assert seen == [sum(conts.values())]  # one batch, one head row per scored position
