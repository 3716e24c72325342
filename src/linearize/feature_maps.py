"""Learned feature maps phi(x) = f(x W (+ b)) for the linear-attention branch, one W per head.

A registry maps a name to its activation f; `FeatureMap` holds the per-head projections.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from linearize.config import FEATURE_MAP_NAMES


@dataclass(frozen=True)
class FeatureMapSpec:
    activation: Callable[[torch.Tensor], torch.Tensor]
    features_per_unit: int  # output features per projected unit (hedgehog concatenates two softmaxes)
    bias: bool
    help: str


def _hedgehog(u: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.softmax(u, dim=-1), torch.softmax(-u, dim=-1)], dim=-1)


def _exp_max_shifted(u: torch.Tensor) -> torch.Tensor:
    # exp(xW) reaches 1e18 at initialisation on Gemma 3 270M and overflows bf16 sums; shifting each token by its
    # largest feature keeps every feature in (0, 1]. For queries the shift cancels exactly in the normalised LA
    # output; for keys it rescales each key by a factor of its own (like softmax's log-sum-exp, but without the sum).
    return torch.exp(u - u.amax(dim=-1, keepdim=True))


def _elu_plus_one(u: torch.Tensor) -> torch.Tensor:
    # 1 + ELU(u) is exp(u) below 0. Written as 1 + (exp(u) - 1) it cancels in bf16: exactly 0 from u = -8 on, while
    # its gradient exp(u) is not, so a key-query product b = 0 sends 1/eps through the transfer KL (grad norm 1e7).
    return torch.where(u > 0, u + 1.0, torch.exp(u.clamp_max(0.0)))


FEATURE_MAPS: dict[str, FeatureMapSpec] = {
    "hedgehog": FeatureMapSpec(_hedgehog, 2, False, "[softmax(xW) ; softmax(-xW)] over the feature axis (Hedgehog / LoLCATs)"),
    "exp": FeatureMapSpec(_exp_max_shifted, 1, False, "exp(xW - max(xW)), element-wise, shifted per token to stay finite"),
    "relu": FeatureMapSpec(F.relu, 1, False, "ReLU(xW)"),
    "elu1": FeatureMapSpec(_elu_plus_one, 1, False, "1 + ELU(xW)"),
    "t2r": FeatureMapSpec(F.relu, 1, True, "ReLU(xW + b) (T2R)"),
    "none": FeatureMapSpec(lambda u: u, 1, False, "xW, no activation (its normaliser can be near zero or negative)"),
}

if tuple(FEATURE_MAPS) != FEATURE_MAP_NAMES:  # config checks names without importing torch: keep both in step
    raise ImportError("linearize.config.FEATURE_MAP_NAMES must name exactly the feature maps defined here")


def num_features(kind: str, head_dim: int, size: str) -> int:
    spec = FEATURE_MAPS[kind]
    return spec.features_per_unit * projection_dim(head_dim, size)


def projection_dim(head_dim: int, size: str) -> int:
    return head_dim if size == "full" else head_dim // 2


class FeatureMap(nn.Module):
    """Per-head feature map: input (B, H, T, d) -> features (B, H, T, m)."""

    def __init__(self, num_heads: int, head_dim: int, kind: str = "hedgehog", size: str = "full", init_noise: float = 0.1):
        super().__init__()
        if kind not in FEATURE_MAPS:
            raise ValueError(f"unknown feature map {kind!r}; expected one of {sorted(FEATURE_MAPS)}")
        self.kind = kind
        self.spec = FEATURE_MAPS[kind]
        out = projection_dim(head_dim, size)
        eye = torch.eye(head_dim)[:, :out]
        weight = eye.expand(num_heads, head_dim, out).clone()
        if init_noise > 0:
            weight += init_noise * torch.randn_like(weight)
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.zeros(num_heads, 1, out)) if self.spec.bias else None

    @property
    def num_features(self) -> int:
        return self.spec.features_per_unit * self.weight.shape[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = torch.einsum("bhtd,hdm->bhtm", x, self.weight.to(x.dtype))
        if self.bias is not None:
            u = u + self.bias.to(x.dtype)
        return self.spec.activation(u)
