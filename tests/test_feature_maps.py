import torch

from linearize.feature_maps import FeatureMap


def _linear_attention(qf: torch.Tensor, kf: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    scores = torch.einsum("bhtm,bhsm->bhts", qf, kf).tril()
    return scores @ v / scores.sum(-1, keepdim=True)


def test_exp_map_stays_finite_in_bf16_at_init_scale():
    torch.manual_seed(0)
    fmap = FeatureMap(num_heads=2, head_dim=16, kind="exp")
    x = 60.0 * torch.randn(1, 2, 10, 16)  # exp(60) overflows bf16 products; the real model reaches exp(41)
    features = fmap(x.bfloat16())
    assert torch.isfinite(features).all()
    assert features.max() <= 1.0 and features.min() >= 0.0
    assert torch.isinf(torch.exp(torch.einsum("bhtd,hdm->bhtm", x, fmap.weight)).bfloat16()).any()


def test_exp_map_shift_cancels_on_the_query_side():
    torch.manual_seed(1)
    fmap = FeatureMap(num_heads=2, head_dim=8, kind="exp").double()
    q, k, v = (torch.randn(2, 2, 12, 8, dtype=torch.float64) for _ in range(3))
    kf = fmap(k)
    unshifted_qf = torch.exp(torch.einsum("bhtd,hdm->bhtm", q, fmap.weight))
    torch.testing.assert_close(_linear_attention(fmap(q), kf, v), _linear_attention(unshifted_qf, kf, v))
