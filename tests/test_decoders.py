"""The Gaussian decoder family p_θ(x | z) and the stacked networks under it: shapes, densities,
variance floor, members computed and initialised independently, errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

from vi.decoders import ACTIVATIONS, GaussianDecoder, log_joint
from vi.nets import FlatParameters, StackedMLP, mlp_shapes
from vi.streams import generator

DTYPE = torch.float64
D, H, M, B, K = 5, 3, 4, 6, 2

# (mean, variance, isotropic): every variant of the model's table.
VARIANTS = [
    ("mlp", "fixed", False),
    ("mlp", "learned", False),
    ("mlp", "heteroscedastic", False),
    ("linear", "fixed", False),
    ("linear", "learned", True),
    ("linear", "learned", False),
]


def _gens(*seeds: int) -> list[torch.Generator]:
    return [generator(s, "init") for s in seeds]


def _make(mean: str, variance: str, isotropic: bool, members: int = K, **kw) -> GaussianDecoder:
    dec = GaussianDecoder(D, H, members=members, mean=mean, variance=variance,
                          isotropic=isotropic, hidden=(7, 8), fixed_var=0.7, init_var=0.9,
                          var_floor=1e-3, generators=_gens(*range(members)), **kw)
    dec = dec.to(DTYPE)
    if variance == "learned":  # move ρ off its initial value so each coordinate and member differs
        raw = dec.params.views()["raw_var"]
        with torch.no_grad():
            raw.copy_(torch.linspace(-1.0, 0.5, raw.numel(), dtype=DTYPE).reshape(raw.shape))
    return dec


def _by_hand(dec: GaussianDecoder, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ, σ²) [M, K, B, D] from the raw parameter views, member by member, without calling the
    decoder's methods."""
    p = dec.params.views()
    means, variances = [], []
    for k in range(dec.members):
        zk = z[:, k]
        if dec.mean_kind == "linear":
            out = zk @ p["w0"][k] + p["b0"][k]
        else:
            hid = torch.tanh(zk @ p["w0"][k] + p["b0"][k])
            hid = torch.tanh(hid @ p["w1"][k] + p["b1"][k])
            out = hid @ p["w2"][k] + p["b2"][k]
        if dec.variance_kind == "heteroscedastic":
            mean, var = out[..., :D], dec.var_floor + torch.exp(out[..., D:])
        elif dec.variance_kind == "learned":
            mean, var = out, (dec.var_floor + torch.exp(p["raw_var"][k])).expand_as(out)
        else:
            mean, var = out, torch.full_like(out, dec.fixed_var)
        means.append(mean)
        variances.append(var)
    return torch.stack(means, 1), torch.stack(variances, 1)


@pytest.mark.parametrize(("mean", "variance", "isotropic"), VARIANTS)
def test_log_likelihood_shape_and_value(mean, variance, isotropic, generator):
    dec = _make(mean, variance, isotropic)
    z = torch.randn(M, K, B, H, generator=generator, dtype=DTYPE)
    x = torch.randn(K, B, D, generator=generator, dtype=DTYPE)
    got = dec.log_likelihood(x, z)
    assert got.shape == (M, K, B) and got.dtype == DTYPE

    mu, var = _by_hand(dec, z)
    expected = Normal(mu, var.sqrt()).log_prob(x.expand(M, K, B, D)).sum(-1)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    formula = (-0.5 * torch.log(2 * math.pi * var) - (x - mu) ** 2 / (2 * var)).sum(-1)
    torch.testing.assert_close(got, formula, rtol=1e-12, atol=1e-12)
    # no leading sample axis: z [K, B, H] → [K, B]
    torch.testing.assert_close(dec.log_likelihood(x, z[0]), got[0], rtol=1e-13, atol=1e-13)

    if variance == "learned":
        assert dec.params.shapes["raw_var"] == ((1,) if isotropic else (D,))
        if isotropic:  # one shared s² across dimensions (PPCA)
            assert torch.all(var == var[..., :1])


@pytest.mark.parametrize(("mean", "variance", "isotropic"), VARIANTS)
def test_log_joint_adds_the_standard_normal_prior(mean, variance, isotropic, generator):
    dec = _make(mean, variance, isotropic)
    z = torch.randn(M, K, B, H, generator=generator, dtype=DTYPE)
    x = torch.randn(K, B, D, generator=generator, dtype=DTYPE)
    prior = Normal(torch.zeros((), dtype=DTYPE), 1.0).log_prob(z).sum(-1)
    torch.testing.assert_close(log_joint(dec, x, z), dec.log_likelihood(x, z) + prior,
                               rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize(("mean", "variance", "isotropic"), VARIANTS)
def test_members_do_not_see_each_other(mean, variance, isotropic, generator):
    """Member k of a stacked decoder computes what a one-member decoder holding its parameters
    computes, and its gradient reaches only its own row of the flat leaf."""
    dec = _make(mean, variance, isotropic)
    z = torch.randn(M, K, B, H, generator=generator, dtype=DTYPE)
    x = torch.randn(K, B, D, generator=generator, dtype=DTYPE)
    both = dec.log_likelihood(x, z)
    for k in range(K):
        alone = _make(mean, variance, isotropic, members=1)
        with torch.no_grad():
            alone.params.flat.copy_(dec.params.flat[k:k + 1])
        torch.testing.assert_close(both[:, k:k + 1], alone.log_likelihood(x[k:k + 1],
                                                                          z[:, k:k + 1]),
                                   rtol=1e-13, atol=1e-13)
        (g,) = torch.autograd.grad(dec.log_likelihood(x, z)[:, k].sum(), dec.params.flat)
        others = torch.ones(K, dtype=torch.bool)
        others[k] = False
        assert torch.equal(g[others], torch.zeros_like(g[others]))
        assert bool((g[k] != 0).any())


def test_initialisation_is_per_member():
    """A member's starting point depends only on its own generator, not on its ensemble:
    member 1 of an ensemble seeded (5, 1, 9) is the single model seeded 1. Weights and biases
    follow nn.Linear's rule U(−1/√fan_in, 1/√fan_in)."""
    three = GaussianDecoder(D, H, members=3, hidden=(7,), generators=_gens(5, 1, 9))
    one = GaussianDecoder(D, H, members=1, hidden=(7,), generators=_gens(1))
    assert torch.equal(three.params.flat[1], one.params.flat[0])
    assert not torch.equal(three.params.flat[0], three.params.flat[2])
    views = three.params.views(three.params.flat.detach())
    for name, fan_in in (("w0", H), ("b0", H), ("w1", 7), ("b1", 7)):
        bound = 1 / math.sqrt(fan_in)
        assert float(views[name].abs().max()) <= bound
        assert float(views[name].abs().max()) > 0.5 * bound
    torch.testing.assert_close(views["raw_var"], torch.full_like(views["raw_var"],
                                                                 math.log(1.0 - 1e-4)))


def test_flat_parameters_are_views_of_one_leaf():
    """All parameters of a network live in one leaf [K, P]: the named views share its storage,
    writes through a view land in the leaf, and gradients arrive as one [K, P] tensor."""
    dec = GaussianDecoder(D, H, members=K, hidden=(4,), generators=_gens(0, 1))
    assert [name for name, _ in dec.named_parameters()] == ["net.params.flat"]
    shapes = {**mlp_shapes([H, 4, D]), "raw_var": (D,)}
    assert dec.params.shapes == shapes
    assert dec.params.flat.shape == (K, sum(math.prod(s) for s in shapes.values()))
    views = dec.params.views()
    assert all(v.shape == (K, *shapes[n]) for n, v in views.items())
    dec.params.fill(1, "b0", torch.arange(4.0))
    assert torch.equal(dec.params.views()["b0"][1], torch.arange(4.0))
    loss = dec.log_likelihood(torch.zeros(K, B, D), torch.ones(K, B, H)).sum()
    (g,) = torch.autograd.grad(loss, dec.params.flat)
    assert g.shape == dec.params.flat.shape
    with pytest.raises(ValueError, match="at least one member"):
        FlatParameters(0, {"w": (2,)})
    with pytest.raises(ValueError, match="layer widths must be positive"):
        StackedMLP(1, [3, 0, 2])
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        StackedMLP(1, [3, 2], activation="gelu")


@pytest.mark.parametrize(("mean", "variance", "isotropic"), VARIANTS)
def test_init_from_data_is_the_no_latent_gaussian(mean, variance, isotropic, generator):
    """Each member starts at the Gaussian of its own data: output bias (the mean head) at the
    data's mean, learned σ² at its per-dimension variance (their average if isotropic), never
    below the floor (a constant dimension); an MLP's last weights shrink to 1 % of their random
    values (μ_θ(z) starts within 1 % of the mean), every other weight keeps its value."""
    dec = _make(mean, variance, isotropic)
    scale = torch.tensor([[0.5, 1.0, 2.0, 0.3, 1.5], [2.0, 0.4, 1.0, 1.0, 0.7]], dtype=DTYPE)
    x = 3.0 + scale.unsqueeze(1) * torch.randn(K, 40, D, generator=generator, dtype=DTYPE)
    x[1, :, 2] = 0.25  # a constant dimension of member 1
    weights = {n: v.clone() for n, v in dec.params.views().items() if n.startswith("w")}
    dec.init_from_data(x)
    p = dec.params.views(dec.params.flat.detach())
    last = len(dec.net.sizes) - 2
    torch.testing.assert_close(p[f"b{last}"][..., :D], x.mean(1))
    for n, w in weights.items():
        shrunk = mean == "mlp" and n == f"w{last}"
        torch.testing.assert_close(p[n], w * 0.01 if shrunk else w, rtol=0, atol=0)
    if variance == "learned":
        var = dec.var_floor + torch.exp(p["raw_var"])
        data_var = x.var(1, correction=0)
        if isotropic:
            torch.testing.assert_close(var[:, 0], data_var.mean(-1))
        else:
            live = torch.ones(K, D, dtype=torch.bool)
            live[1, 2] = False
            torch.testing.assert_close(var[live], data_var[live])
            assert dec.var_floor <= float(var[1, 2]) < 0.01
    elif variance == "fixed":
        assert torch.equal(dec.mean_and_variance(torch.zeros(K, 1, H, dtype=DTYPE))[1],
                           torch.full((1,), 0.7, dtype=DTYPE))


@pytest.mark.parametrize("variance", ["learned", "heteroscedastic"])
def test_variance_floor_is_respected(variance, generator):
    floor = 1e-3
    dec = _make("mlp", variance, False)
    with torch.no_grad():
        if variance == "learned":
            dec.params.views()["raw_var"].fill_(-1e4)
        else:  # drive the log-variance head to −∞
            dec.params.views()["b2"][..., D:] = -1e4
    z = torch.randn(M, K, B, H, generator=generator, dtype=DTYPE)
    _, var = dec.mean_and_variance(z)
    assert bool((var >= floor).all())
    torch.testing.assert_close(var, torch.full_like(var, floor), rtol=1e-12, atol=0)
    ll = dec.log_likelihood(torch.randn(K, B, D, generator=generator, dtype=DTYPE), z)
    assert bool(torch.isfinite(ll).all())


def test_linear_variance_floor_is_respected():
    dec = _make("linear", "learned", True)
    with torch.no_grad():
        dec.params.views()["raw_var"].fill_(-800.0)
    _, _, psi = dec.linear_parameters()
    assert bool((psi >= dec.var_floor).all())


@pytest.mark.parametrize("isotropic", [True, False])
def test_linear_parameters_round_trip(isotropic, generator):
    """(W, b, Ψ) per member: one set broadcast to every member, or one set per member."""
    dec = _make("linear", "learned", isotropic)
    W = torch.randn(D, H, generator=generator, dtype=DTYPE)
    b = torch.randn(D, generator=generator, dtype=DTYPE)
    psi = torch.tensor(0.37, dtype=DTYPE) if isotropic else 0.1 + torch.rand(
        D, generator=generator, dtype=DTYPE)
    dec.set_linear_parameters(W, b, psi)
    W2, b2, psi2 = dec.linear_parameters()
    assert W2.shape == (K, D, H) and b2.shape == (K, D) and psi2.shape == (K, D)
    torch.testing.assert_close(W2, W.expand(K, D, H), rtol=0, atol=0)
    torch.testing.assert_close(b2, b.expand(K, D), rtol=0, atol=0)
    torch.testing.assert_close(psi2, psi.expand(K, D), rtol=1e-13, atol=1e-15)
    # linear_parameters stays differentiable in the raw variance (the closed forms need it)
    assert psi2.requires_grad

    Wk = torch.randn(K, D, H, generator=generator, dtype=DTYPE)
    bk = torch.randn(K, D, generator=generator, dtype=DTYPE)
    psik = (torch.tensor([[0.2], [0.6]], dtype=DTYPE).expand(K, D) if isotropic
            else 0.1 + torch.rand(K, D, generator=generator, dtype=DTYPE))
    dec.set_linear_parameters(Wk, bk, psik)
    W3, b3, psi3 = dec.linear_parameters()
    torch.testing.assert_close(W3, Wk, rtol=0, atol=0)
    torch.testing.assert_close(b3, bk, rtol=0, atol=0)
    torch.testing.assert_close(psi3, psik, rtol=1e-13, atol=1e-15)
    # the mean is W z + b for each member
    z = torch.randn(K, B, H, generator=generator, dtype=DTYPE)
    mean, _ = dec.mean_and_variance(z)
    torch.testing.assert_close(mean, z @ Wk.transpose(-1, -2) + bk.unsqueeze(1))


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
    with pytest.raises(ValueError, match="one noise variance for every dimension"):
        _make("linear", "learned", True).set_linear_parameters(
            torch.zeros(D, H, dtype=DTYPE), torch.zeros(D, dtype=DTYPE),
            torch.linspace(0.1, 0.5, D, dtype=DTYPE))
    with pytest.raises(ValueError, match="needs a decoder with mean='linear'"):
        _make("mlp", "fixed", False).linear_parameters()


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_every_activation_builds(activation, generator):
    dec = GaussianDecoder(D, H, hidden=(4,), activation=activation, generators=_gens(0))
    assert dec.net.activation == activation
    assert dec.log_likelihood(torch.zeros(1, B, D), torch.zeros(M, 1, B, H)).shape == (M, 1, B)
    z = torch.randn(1, B, H, generator=generator)
    p = dec.params.views()
    hidden = ACTIVATIONS[activation](z @ p["w0"] + p["b0"].unsqueeze(1))
    torch.testing.assert_close(dec.mean_and_variance(z)[0], hidden @ p["w1"] + p["b1"].unsqueeze(1))


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
    with pytest.raises(ValueError, match="at least one member"):
        GaussianDecoder(D, H, members=0)


def test_wrong_input_dimensions_raise():
    dec = GaussianDecoder(D, H, members=K, generators=_gens(0, 1))
    with pytest.raises(ValueError, match=r"decoder expects x \[\.\.\., 5\]"):
        dec.log_likelihood(torch.zeros(K, B, D + 1), torch.zeros(M, K, B, H))
    with pytest.raises(ValueError, match=r"decoder expects z \[\.\.\., K=2, R, H=3\]"):
        dec.log_likelihood(torch.zeros(K, B, D), torch.zeros(M, K, B, H + 1))
    with pytest.raises(ValueError, match=r"decoder expects z \[\.\.\., K=2, R, H=3\]"):
        dec.log_likelihood(torch.zeros(3, B, D), torch.zeros(M, 3, B, H))  # three members
    with pytest.raises(ValueError, match=r"decoder expects z \[\.\.\., K=2, R, H=3\]"):
        dec.log_likelihood(torch.zeros(B, D), torch.zeros(B, H))  # no member axis
