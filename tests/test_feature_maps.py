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


def test_elu1_map_has_no_bf16_cancellation_and_keeps_the_transfer_gradient_bounded():
    import torch.nn.functional as F

    from linearize.feature_maps import FEATURE_MAPS
    from linearize.train.transfer import attention_weights_kl

    elu1 = FEATURE_MAPS["elu1"].activation
    u = torch.linspace(-20, 5, 101, dtype=torch.float64)
    torch.testing.assert_close(elu1(u), 1.0 + F.elu(u))  # the same function
    low = torch.tensor([-8.0, -12.0, -20.0], dtype=torch.bfloat16)
    assert (1.0 + F.elu(low) == 0).all() and (elu1(low) > 0).all()  # the naive form rounds to 0 in bf16
    torch.testing.assert_close(elu1(low).float(), torch.exp(low.float()), rtol=1e-2, atol=0)

    torch.manual_seed(0)  # large pre-activations, as a trained map reaches: the bf16 gradient matches float64's
    q, k = torch.randn(1, 2, 256, 16), torch.randn(1, 2, 256, 16)
    w0 = 2.5 * torch.randn(2, 16, 16)
    norms = {}
    for dtype in (torch.bfloat16, torch.float64):
        w = w0.clone().requires_grad_()
        uq, uk = (torch.einsum("bhtd,hdm->bhtm", x.to(dtype), w.to(dtype)) - 5 for x in (q, k))
        attention_weights_kl(q, k, elu1(uq), elu1(uk), scale=0.25).backward()
        norms[dtype] = w.grad.norm().item()
    assert abs(norms[torch.bfloat16] / norms[torch.float64] - 1) < 0.2, norms
