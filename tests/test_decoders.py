"""The Gaussian decoder family p_θ(x | z) (SPEC §1): shapes, densities, variance floor, errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

from vi.decoders import ACTIVATIONS, GaussianDecoder, log_joint

DTYPE = torch.float64
D, H, M, B = 5, 3, 4, 6

# (mean, variance, isotropic): every variant of SPEC §1's table.
VARIANTS = [
    ("mlp", "fixed", False),
    ("mlp", "learned", False),
    ("mlp", "heteroscedastic", False),
    ("linear", "fixed", False),
    ("linear", "learned", True),
    ("linear", "learned", False),
]


def _make(mean: str, variance: str, isotropic: bool, **kw) -> GaussianDecoder:
    torch.manual_seed(0)
    dec = GaussianDecoder(D, H, mean=mean, variance=variance, isotropic=isotropic,
                          hidden=(7, 8), fixed_var=0.7, init_var=0.9, var_floor=1e-3, **kw)
    dec = dec.to(DTYPE)
    if variance == "learned":  # move ρ off its initial value so each coordinate differs
        with torch.no_grad():
            dec.raw_var.copy_(torch.linspace(-1.0, 0.5, dec.raw_var.numel(), dtype=DTYPE))
    return dec


def _by_hand(dec: GaussianDecoder, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ, σ²) computed from the raw parameters, without calling the decoder's methods."""
    if dec.mean_kind == "linear":
        out = z @ dec.net.weight.T + dec.net.bias
    else:
        lin1, act, lin2, act2, lin3 = dec.net
        assert isinstance(act, ACTIVATIONS["tanh"]) and isinstance(act2, ACTIVATIONS["tanh"])
        hid = torch.tanh(z @ lin1.weight.T + lin1.bias)
        hid = torch.tanh(hid @ lin2.weight.T + lin2.bias)
        out = hid @ lin3.weight.T + lin3.bias
    if dec.variance_kind == "heteroscedastic":
        return out[..., :D], dec.var_floor + torch.exp(out[..., D:])
    if dec.variance_kind == "learned":
        var = (dec.var_floor + torch.exp(dec.raw_var)).expand(D)
    else:
        var = torch.full((D,), dec.fixed_var, dtype=DTYPE)
    return out, var.expand_as(out)


@pytest.mark.parametrize(("mean", "variance", "isotropic"), VARIANTS)
def test_log_likelihood_shape_and_value(mean, variance, isotropic, generator):
    dec = _make(mean, variance, isotropic)
    z = torch.randn(M, B, H, generator=generator, dtype=DTYPE)
    x = torch.randn(B, D, generator=generator, dtype=DTYPE)
    got = dec.log_likelihood(x, z)
    assert got.shape == (M, B) and got.dtype == DTYPE

    mu, var = _by_hand(dec, z)
    expected = Normal(mu, var.sqrt()).log_prob(x.expand(M, B, D)).sum(-1)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    formula = (-0.5 * torch.log(2 * math.pi * var) - (x - mu) ** 2 / (2 * var)).sum(-1)
    torch.testing.assert_close(got, formula, rtol=1e-12, atol=1e-12)

    if variance == "learned":
        assert dec.raw_var.shape == ((1,) if isotropic else (D,))
        if isotropic:  # one shared s² across dimensions (PPCA)
            assert torch.all(var == var[..., :1])


@pytest.mark.parametrize(("mean", "variance", "isotropic"), VARIANTS)
def test_log_joint_adds_the_standard_normal_prior(mean, variance, isotropic, generator):
    dec = _make(mean, variance, isotropic)
    z = torch.randn(M, B, H, generator=generator, dtype=DTYPE)
    x = torch.randn(B, D, generator=generator, dtype=DTYPE)
    prior = Normal(torch.zeros((), dtype=DTYPE), 1.0).log_prob(z).sum(-1)
    torch.testing.assert_close(log_joint(dec, x, z), dec.log_likelihood(x, z) + prior,
                               rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("variance", ["learned", "heteroscedastic"])
def test_variance_floor_is_respected(variance, generator):
    floor = 1e-3
    dec = _make("mlp", variance, False)
    with torch.no_grad():
        if variance == "learned":
            dec.raw_var.fill_(-1e4)
        else:  # drive the log-variance head to −∞
            dec.net[-1].bias[D:] = -1e4
    z = torch.randn(M, B, H, generator=generator, dtype=DTYPE)
    _, var = dec.mean_and_variance(z)
    assert bool((var >= floor).all())
    torch.testing.assert_close(var, torch.full_like(var, floor), rtol=1e-12, atol=0)
    ll = dec.log_likelihood(torch.randn(B, D, generator=generator, dtype=DTYPE), z)
    assert bool(torch.isfinite(ll).all())


def test_linear_variance_floor_is_respected():
    dec = _make("linear", "learned", True)
    with torch.no_grad():
        dec.raw_var.fill_(-800.0)
    _, _, psi = dec.linear_parameters()
    assert bool((psi >= dec.var_floor).all())


@pytest.mark.parametrize("isotropic", [True, False])
def test_linear_parameters_round_trip(isotropic, generator):
    dec = _make("linear", "learned", isotropic)
    W = torch.randn(D, H, generator=generator, dtype=DTYPE)
    b = torch.randn(D, generator=generator, dtype=DTYPE)
    psi = torch.tensor(0.37, dtype=DTYPE) if isotropic else 0.1 + torch.rand(
        D, generator=generator, dtype=DTYPE)
    dec.set_linear_parameters(W, b, psi)
    W2, b2, psi2 = dec.linear_parameters()
    assert W2.shape == (D, H) and b2.shape == (D,) and psi2.shape == (D,)
    torch.testing.assert_close(W2, W, rtol=0, atol=0)
    torch.testing.assert_close(b2, b, rtol=0, atol=0)
    torch.testing.assert_close(psi2, psi.expand(D), rtol=1e-13, atol=1e-15)
    # linear_parameters stays differentiable in the raw variance (the closed forms need it)
    assert psi2.requires_grad


def test_set_linear_parameters_rejects_bad_targets():
    with pytest.raises(ValueError, match="needs mean='linear', variance='learned'"):
        _make("mlp", "learned", False).set_linear_parameters(
            torch.zeros(D, H), torch.zeros(D), 1.0)
    with pytest.raises(ValueError, match="needs mean='linear', variance='learned'"):
        _make("linear", "fixed", False).set_linear_parameters(
            torch.zeros(D, H), torch.zeros(D), 1.0)
    with pytest.raises(ValueError, match="must exceed the floor"):
        _make("linear", "learned", True).set_linear_parameters(
            torch.zeros(D, H, dtype=DTYPE), torch.zeros(D, dtype=DTYPE), 1e-4)
    with pytest.raises(ValueError, match="needs a decoder with mean='linear'"):
        _make("mlp", "fixed", False).linear_parameters()


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_every_activation_builds(activation):
    dec = GaussianDecoder(D, H, hidden=(4,), activation=activation)
    assert isinstance(dec.net[1], ACTIVATIONS[activation])
    assert dec.log_likelihood(torch.zeros(B, D), torch.zeros(M, B, H)).shape == (M, B)


def test_bad_constructor_arguments_raise():
    with pytest.raises(ValueError, match="unknown decoder mean 'conv'; valid: mlp, linear"):
        GaussianDecoder(D, H, mean="conv")
    with pytest.raises(ValueError, match="unknown decoder variance 'free'; valid: fixed"):
        GaussianDecoder(D, H, variance="free")
    with pytest.raises(ValueError, match="unknown activation 'gelu'; valid: tanh"):
        GaussianDecoder(D, H, activation="gelu")
    with pytest.raises(ValueError, match="no heteroscedastic variant"):
        GaussianDecoder(D, H, mean="linear", variance="heteroscedastic")
    with pytest.raises(ValueError, match="var_floor must be a finite number >= 0"):
        GaussianDecoder(D, H, var_floor=-1e-3)
    with pytest.raises(ValueError, match="var_floor must be a finite number >= 0"):
        GaussianDecoder(D, H, var_floor=float("nan"))
    with pytest.raises(ValueError, match="init_var > var_floor"):
        GaussianDecoder(D, H, var_floor=1.0, init_var=0.5)
    with pytest.raises(ValueError, match="must be positive"):
        GaussianDecoder(0, H)
    with pytest.raises(ValueError, match="hidden widths must be positive"):
        GaussianDecoder(D, H, hidden=(4, 0))


def test_wrong_input_dimensions_raise():
    dec = GaussianDecoder(D, H)
    with pytest.raises(ValueError, match=r"decoder expects x \[\.\.\., 5\] and z \[\.\.\., 3\]"):
        dec.log_likelihood(torch.zeros(B, D + 1), torch.zeros(M, B, H))
    with pytest.raises(ValueError, match="decoder expects"):
        dec.log_likelihood(torch.zeros(B, D), torch.zeros(M, B, H + 1))
