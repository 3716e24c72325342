"""Loading models for evaluation, and converted models inside lm-eval.

* :func:`load_model` turns what a user types after ``--model`` into ``(model, tokenizer, info)``:
  a short name or HF directory of a base model (:func:`linearize.load_base`), or a directory written
  by ``linearize convert`` / ``save_pretrained`` of a converted model (its ``config.json`` has a
  ``linearize`` entry; :func:`linearize.load`). ``convert=True`` converts a base model on the fly
  with an *untrained* feature map (for diagnostics of the bare hybrid layer).
* :func:`set_components` switches the branches of a converted model persistently (the
  :func:`linearize.components` context manager restores them on exit; lm-eval needs a model that
  stays switched while it runs).
* :class:`LinearizeLM` is lm-eval's ``HFLM`` registered as ``"linearize"``: it loads with
  :func:`load_model` and accepts ``components=`` (and ``convert=``, ``window=``) in ``model_args``.
  Plain ``HFLM(pretrained=model)`` already works on a converted model (it is an ordinary HF model
  object). lm-eval has no plugin discovery for models, so its CLI sees the name only once this module
  is imported: ``linearize lm-eval <lm_eval arguments>`` (:mod:`linearize.commands.lmeval`) does that,
  adds ``--include_path`` for the offline ``lz_*`` task configs and runs lm-eval's own CLI, e.g.
  ``linearize lm-eval --model linearize --model_args pretrained=runs/ssd,components=la_only --device cpu
  --tasks lz_piqa`` (put the device in ``--device``, not in ``--model_args``: lm-eval passes both and
  Python refuses the duplicate keyword).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from pathlib import Path
from typing import Any

import torch

from linearize.config import COMPONENT_MODES, HybridConfig
from linearize.errors import LinearizeError, ModelFileError
from linearize.models.convert import convert as convert_model, hybrid_config_of, hybrid_modules, is_converted, load, set_hybrid
from linearize.models.loading import load_base

__all__ = ["load_model", "converted_dir_info", "set_components", "continuation_scorer", "LinearizeLM", "register"]


def converted_dir_info(path: str | Path) -> dict[str, Any] | None:
    """For a directory holding a converted model: ``{"hybrid": settings, "base": name|None, "recipe": name|None}``.

    ``base`` and ``recipe`` come from ``summary.json`` (written by ``linearize convert``) when present.
    ``None`` when ``path`` is not a directory with a ``linearize`` entry in its ``config.json``.
    """
    path = Path(path)
    cfg = path / "config.json"
    if not cfg.is_file():
        return None
    try:
        settings = json.loads(cfg.read_text()).get("linearize")
    except (OSError, json.JSONDecodeError):
        return None
    if not settings:
        return None
    info: dict[str, Any] = {"hybrid": settings, "base": None, "recipe": None}
    summary = path / "summary.json"
    if summary.is_file():
        try:
            data = json.loads(summary.read_text())
            info["base"] = data.get("model")
            info["recipe"] = data.get("recipe")
        except (OSError, json.JSONDecodeError):
            pass
    return info


def load_model(
    spec,
    *,
    tokenizer=None,
    convert: bool = False,
    window: int | None = None,
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
    check: bool = True,
    seed: int = 0,
    hybrid: dict[str, Any] | None = None,
) -> tuple[Any, Any, dict[str, Any]]:
    """Load ``spec`` for evaluation: ``(model, tokenizer, info)``.

    Args:
        spec: a short name (``gemma3-270m``), an HF model directory, a ``.gguf`` file, a converted
            model directory, or an already loaded model object (then ``tokenizer`` is required).
        tokenizer: overrides the tokenizer (a loaded one).
        convert: convert a base model with an untrained feature map (identity + noise, the
            :class:`HybridConfig` defaults) so that its component modes can be run.
        window: sliding window of that conversion (default :class:`HybridConfig`'s, 64).
        device: where the model goes (default: CUDA when available, else CPU).
        check: the degenerate-output check of :func:`linearize.load_base`.
        seed: torch seed for the untrained feature maps.
        hybrid: computation-only HybridConfig changes (:func:`linearize.set_hybrid`), e.g. ``{"window": 512}``;
            with ``convert`` they are part of the on-the-fly conversion.

    ``info``: ``{"model": spec as text, "kind": "base"|"converted"|"converted_untrained",
    "base": base model name or None, "recipe": recipe or None, "hybrid": settings or None}``.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    info: dict[str, Any] = {"model": str(spec), "kind": "base", "base": None, "recipe": None, "hybrid": None}
    if not isinstance(spec, (str, Path)):
        if tokenizer is None:
            raise LinearizeError("load_model(model_object) needs tokenizer=")
        model = spec.to(device)
        info["model"] = getattr(model.config, "_name_or_path", None) or type(model).__name__
        info["kind"] = "converted" if is_converted(model) else "base"
    else:
        conv = converted_dir_info(spec)
        if conv is not None:
            model = load(spec, dtype=dtype, device=device)
            if tokenizer is None:
                tokenizer = _tokenizer_for(Path(spec), conv.get("base"), model)
            info.update(kind="converted", base=conv["base"], recipe=conv["recipe"])
        else:
            model, tok = load_base(str(spec), dtype=dtype, device=device, check=check)
            tokenizer = tokenizer or tok
            info["base"] = str(spec)
    if convert:
        if is_converted(model):
            raise LinearizeError(f"{spec} is already converted; drop --convert")
        settings = {**({} if window is None else {"window": window}), **(hybrid or {})}
        torch.manual_seed(seed)
        convert_model(model, HybridConfig(**settings))
        model.to(device).eval()
        info["kind"] = "converted_untrained"
    elif hybrid:
        if not is_converted(model):
            raise LinearizeError(f"hybrid settings {sorted(hybrid)} need a converted model; {spec} is a base model")
        try:
            set_hybrid(model, **hybrid)
        except ValueError as exc:
            raise LinearizeError(str(exc)) from None
    if is_converted(model):
        info["hybrid"] = hybrid_config_of(model).to_dict()
    if tokenizer is not None and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer, info


def _tokenizer_for(path: Path, base: str | None, model):
    """The converted directory's tokenizer, else the base model's; ModelFileError when neither is usable.

    transformers can build a placeholder tokenizer of a handful of tokens from a config alone (Gemma 3 does)
    instead of failing, so a tokenizer is usable only when it covers at least half the model's vocabulary."""
    from transformers import AutoTokenizer

    vocab = model.get_output_embeddings().weight.shape[0]
    problem = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        if 2 * len(tokenizer) >= vocab:
            return tokenizer
        problem = f"its tokenizer has {len(tokenizer)} tokens for a model of {vocab}"
    except (OSError, ValueError, TypeError) as exc:
        problem = f"it has no usable tokenizer files ({str(exc).splitlines()[0]})"
    if base:
        tokenizer = load_base(base, check=False)[1]
        if 2 * len(tokenizer) >= vocab:
            return tokenizer
        problem += f", nor has the base model {base} ({len(tokenizer)} tokens)"
    raise ModelFileError(f"{path}: {problem}; copy the base model's tokenizer files into it"
                         + ("" if base else " (no base model is recorded in summary.json)"))


def set_components(model, modes) -> None:
    """Switch branches persistently (unlike :func:`linearize.components`, nothing is restored).

    ``modes``: a mode name for every converted layer, ``{layer: mode}`` or ``{layer: {head: mode}}``.
    """
    modules = {m.layer_idx: m for m in hybrid_modules(model)}
    if not modules:
        raise LinearizeError("components= needs a converted model (no hybrid attention layers found)")
    plan = {i: modes for i in modules} if isinstance(modes, str) else modes
    for i, mode in plan.items():
        if i not in modules:
            raise LinearizeError(f"layer {i} is not converted (converted: {sorted(modules)})")
        if isinstance(mode, str):
            if mode not in COMPONENT_MODES:
                raise LinearizeError(f"unknown component mode {mode!r}; expected one of {COMPONENT_MODES}")
            modules[i].mode, modules[i].head_modes = mode, None
        else:
            modules[i].head_modes = dict(mode)
        modules[i].head_mode_list()


@contextlib.contextmanager
def _silenced(logger: logging.Logger, fragments: tuple[str, ...]):
    """Drop `logger`'s records that contain one of `fragments` while the block runs."""
    drop = lambda record: not any(f in record.getMessage() for f in fragments)  # noqa: E731
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


@functools.cache
def continuation_scorer():
    """lm-eval's ``HFLM`` that computes the LM head only where a continuation is scored.

    HFLM takes a full-vocabulary log-softmax at every position of every request; with Gemma's 262k
    vocabulary that is most of the work (and memory) of a multiple-choice benchmark, although only
    the continuation positions are read. Here a pre-hook on the output embedding keeps exactly those
    positions before the head runs, so whatever the model does after the head (e.g. final logit
    soft-capping) still applies. Requests whose model inputs are identical (the same context and
    continuation up to its last token: MMLU's four one-token answers) share one forward pass, as in
    HFLM. Scores equal HFLM's (a test checks it); ``batch_size="auto"`` uses HFLM's own path.
    """
    import torch.nn.functional as F
    from lm_eval.models.huggingface import HFLM
    from tqdm.auto import tqdm

    class ContinuationHFLM(HFLM):
        def __init__(self, pretrained=None, *args, **kwargs):
            if not isinstance(pretrained, str):
                # HFLM warns on every model object that other model arguments "may be ignored": we load the model
                # ourselves on purpose, and pass only the arguments HFLM still reads (batch size, max length)
                with _silenced(logging.getLogger("lm_eval.models.huggingface"),
                               ("model kwarg is not of type", "Passed an already-initialized model")):
                    super().__init__(pretrained, *args, **kwargs)
            else:
                super().__init__(pretrained, *args, **kwargs)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
            head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
            if head is None or self.batch_size == "auto" or self.backend != "causal":
                return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
            inputs: dict[tuple[int, ...], list[int]] = {}  # model input -> indices of its requests
            for i, (_, context, continuation) in enumerate(requests):
                if not context or not continuation or len(continuation) > self.max_length:
                    raise LinearizeError(f"bad loglikelihood request {requests[i][0]!r}")
                inputs.setdefault(tuple((context + continuation)[-(self.max_length + 1):][:-1]), []).append(i)
            order = sorted(inputs, key=lambda toks: (-len(toks), toks))  # longest first: OOM shows at once
            results: list[tuple[float, bool] | None] = [None] * len(requests)
            keep: dict[str, torch.Tensor] = {}
            hook = head.register_forward_pre_hook(lambda _m, args: (args[0][keep["rows"], keep["cols"]][None],))
            pbar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                        desc="Running loglikelihood requests")
            try:
                for start in range(0, len(order), int(override_bs or self.batch_size)):
                    batch = order[start:start + int(override_bs or self.batch_size)]
                    width = len(batch[0])
                    ids = torch.zeros(len(batch), width, dtype=torch.long)  # right padding never reaches a real token
                    rows, cols, spans = [], [], []
                    for r, toks in enumerate(batch):
                        ids[r, :len(toks)] = torch.tensor(toks)
                        n = max(len(requests[i][2]) for i in inputs[toks])
                        spans.append((len(rows), n))
                        rows += [r] * n
                        cols += range(len(toks) - n, len(toks))
                    keep["rows"], keep["cols"] = torch.tensor(rows, device=self.device), torch.tensor(cols, device=self.device)
                    with torch.no_grad():
                        logits = self.model(ids.to(self.device)).logits[0]
                    if logits.shape[0] != len(rows):
                        raise LinearizeError(f"{type(self.model).__name__} changes the shape after its output "
                                             "embedding; run with batch_size='auto' to use lm-eval's own scoring")
                    logp = F.log_softmax(logits.float(), dim=-1)
                    positions, targets, owners = [], [], []  # every request's rows of `logp`, gathered at once
                    for toks, (first, n) in zip(batch, spans):
                        for i in inputs[toks]:
                            continuation = requests[i][2]
                            positions += range(first + n - len(continuation), first + n)
                            targets += continuation
                            owners.append((i, len(continuation)))
                    positions = torch.tensor(positions, device=logp.device)
                    targets = torch.tensor(targets, device=logp.device)
                    picked = logp[positions, targets].cpu()
                    greedy = (logp.argmax(-1)[positions] == targets).cpu()
                    at = 0
                    for i, length in owners:
                        answer = (float(picked[at:at + length].sum()), bool(greedy[at:at + length].all()))
                        at += length
                        results[i] = answer
                        if requests[i][0] is not None:
                            self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
                        pbar.update(1)
            finally:
                hook.remove()
                pbar.close()
            return results

    return ContinuationHFLM


def _make_class():
    from lm_eval.api.registry import register_model

    @register_model("linearize")
    class LinearizeLM(continuation_scorer()):
        """lm-eval's HFLM over a model loaded by :func:`load_model`.

        ``model_args``: ``pretrained`` (short name, HF dir or converted dir, or a model object),
        ``components`` (hybrid, swa_only, la_only, sinks_only, none), ``convert`` (bool: convert a
        base model with an untrained feature map), ``window`` (its window), plus HFLM's own
        ``batch_size``, ``max_length``, ``device``.
        """

        def __init__(self, pretrained, components: str | None = None, convert: bool | str = False,
                     window: int | str | None = None, device: str | None = None, tokenizer=None,
                     check: bool | str = True, **kwargs):
            convert = _as_bool(convert)
            model, tok, info = load_model(pretrained, tokenizer=tokenizer if not isinstance(tokenizer, str) else None,
                                          convert=convert, window=int(window) if window else None, device=device,
                                          check=_as_bool(check))
            if components:
                set_components(model, components)
            self.linearize_info = {**info, "components": components}
            kwargs.pop("dtype", None)
            super().__init__(pretrained=model, tokenizer=tok, **kwargs)

    return LinearizeLM


def _as_bool(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "y")
    return bool(value)


_CLASS = None


def register():
    """Register ``"linearize"`` in lm-eval's model registry (idempotent) and return the class."""
    global _CLASS
    if _CLASS is None:
        _CLASS = _make_class()
    return _CLASS


def __getattr__(name):  # LinearizeLM is built lazily: importing lm-eval takes seconds
    if name == "LinearizeLM":
        return register()
    raise AttributeError(name)
