"""The tests call the attention backends with loose keywords; `with_spec` gathers the `AttentionSpec` fields among
them into the one `spec` the backends take."""

from __future__ import annotations

import dataclasses

from linearize.attention.spec import AttentionSpec

SPEC_FIELDS = {f.name for f in dataclasses.fields(AttentionSpec)}


def with_spec(**kw) -> dict:
    """Backend keywords: the spec's fields as one AttentionSpec, the rest as they are. Where a call gives no scale or
    window, the backend reads none (`prefill_state` no scale; decoding takes the window from the state)."""
    fields = {"scale": 1.0, "window": 1, **{k: v for k, v in kw.items() if k in SPEC_FIELDS}}
    return {"spec": AttentionSpec(**fields), **{k: v for k, v in kw.items() if k not in SPEC_FIELDS}}
