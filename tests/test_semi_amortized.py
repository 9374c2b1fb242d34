"""Semi-amortized inference: the gradients of a training step against finite differences of the
whole K-step computation, the estimators SA-VAE accepts, and held-out refinement with one
procedure for every training estimator.

The finite-difference checks replay a step's computation as a plain function of (θ, φ) on the
same noise streams (``MemberRandom`` from the same seeds draws the same numbers), in float64,
and compare the central difference along a random direction with the gradient the step applied:
SA-VAE's must be the total derivative of L(λ⁽ᴷ⁾(θ, φ), θ); semi_amortized's decoder gradient the
partial derivative at the detached λ⁽ᴷ⁾ and its encoder gradient that of L(λ⁽⁰⁾(φ), θ).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import DTYPE, member_random

from vi.decoders import GaussianDecoder
from vi.estimators import ESTIMATORS, twice_differentiable
from vi.inference import MethodSettings, build_method
from vi.streams import generator

SEEDS = [3, 7]
DIM, LATENT, POINTS, STEPS = 5, 2, 6, 3


def _method(name: str, settings: MethodSettings | None = None, **kw):
    gens = [generator(s, "init") for s in SEEDS]
    decoder = GaussianDecoder(DIM, LATENT, members=len(SEEDS), hidden=(8,),
                              generators=gens).to(DTYPE)
    settings = settings or MethodSettings(name=name, encoder_hidden=(8,), refine_steps=STEPS,
                                          refine_lr=0.05, **kw)
    method = build_method(decoder, [settings] * len(SEEDS), POINTS, gens).to(DTYPE)
    x = torch.rand(len(SEEDS), POINTS, DIM, generator=torch.Generator().manual_seed(1),
                   dtype=DTYPE)
    return method, x


def _applied_gradients(method, x):
    """The (θ, φ) gradients one training step hands its optimiser (the step itself skipped)."""
    method.opt.step = lambda active: None
    active = torch.ones(len(SEEDS), dtype=torch.bool)
    method.train_step(x, None, member_random(*SEEDS), active)
    return (method.decoder.params.flat.grad.detach().clone(),
            method.encoder.params.flat.grad.detach().clone())


def _loss_sa_vae(method, x):
    """−Σ mean_n L̂(λ⁽ᴷ⁾(θ, φ), θ): the refinement from f_φ(x), then the ELBO estimate, on the
    step's noise (K refinement draws, then one)."""
    random = member_random(*SEEDS)
    lam = method.local_ascent(x, method.encoder(x), random, STEPS)
    return -method.estimate(x, lam, random).surrogate.mean(1).sum()


def _directional(fn, leaf: torch.Tensor, direction: torch.Tensor, h: float = 1e-5) -> float:
    with torch.no_grad():
        leaf.add_(h * direction)
    up = float(fn().detach())
    with torch.no_grad():
        leaf.sub_(2 * h * direction)
    down = float(fn().detach())
    with torch.no_grad():
        leaf.add_(h * direction)
    return (up - down) / (2 * h)


@pytest.mark.parametrize("kl", ["analytic", "mc"])
def test_sa_vae_gradients_are_total_derivatives_of_the_refined_elbo(kl):
    """θ's and φ's gradients are the total derivatives of L(λ⁽ᴷ⁾(θ, φ), θ) through the K
    refinement steps (Kim et al. 2018, Algorithm 1): each matches the central difference of
    the replayed computation along a random direction to 1e-6 relative. The partial ∇_θ at a
    detached λ⁽ᴷ⁾ does not (it misses (∂λ⁽ᴷ⁾/∂θ)ᵀ ∇_λ L). With the reparameterization
    gradient the step's gradient is the derivative of the estimate's value, which finite
    differences see; the other estimators' second derivatives are tested in
    test_estimators.py."""
    method, x = _method("sa_vae", kl=kl, refine_clip=None)
    dec_grad, enc_grad = _applied_gradients(method, x)
    g = torch.Generator().manual_seed(5)
    for leaf, grad in ((method.decoder.params.flat, dec_grad),
                       (method.encoder.params.flat, enc_grad)):
        v = torch.randn(leaf.shape, generator=g, dtype=DTYPE)
        fd = _directional(lambda: _loss_sa_vae(method, x), leaf, v)
        assert float((grad * v).sum()) == pytest.approx(fd, rel=1e-6, abs=1e-9)

    # the partial derivative at the detached λ⁽ᴷ⁾ is measurably different
    random = member_random(*SEEDS)
    lam_k = method.local_ascent(x, method.encoder(x), random, STEPS).detach()
    est = method.estimate(x, lam_k, random)
    (partial,) = torch.autograd.grad(-est.surrogate.mean(1).sum(), [method.decoder.params.flat])
    gap = float((partial - dec_grad).norm() / dec_grad.norm())
    assert gap > 1e-3, gap


def test_semi_amortized_gradients_are_the_vae_plus_svi_ones():
    """semi_amortized: θ's gradient is ∂L(λ⁽ᴷ⁾, θ)/∂θ at the refined λ⁽ᴷ⁾ held fixed, φ's that
    of L(f_φ(x), θ) at λ⁽⁰⁾ (no gradient through the refinement), each on its own draw."""
    method, x = _method("semi_amortized", refine_clip=None)
    dec_grad, enc_grad = _applied_gradients(method, x)
    lam_k = method.local_ascent(x, method.encoder(x).detach(), member_random(*SEEDS),
                                STEPS).detach()
    g = torch.Generator().manual_seed(6)

    def dec_loss():
        r = member_random(*SEEDS)
        method.local_ascent(x, method.encoder(x).detach(), r, STEPS)  # advance the streams
        return -method.estimate(x, lam_k, r).surrogate.mean(1).sum()

    def enc_loss():
        r = member_random(*SEEDS)
        method.local_ascent(x, method.encoder(x).detach(), r, STEPS)
        method.estimate(x, lam_k, r)  # θ's draw
        return -method.estimate(x, method.encoder(x), r).surrogate.mean(1).sum()

    v = torch.randn(method.decoder.params.flat.shape, generator=g, dtype=DTYPE)
    fd = _directional(dec_loss, method.decoder.params.flat, v)
    assert float((dec_grad * v).sum()) == pytest.approx(fd, rel=1e-6, abs=1e-9)
    v = torch.randn(method.encoder.params.flat.shape, generator=g, dtype=DTYPE)
    fd = _directional(enc_loss, method.encoder.params.flat, v)
    assert float((enc_grad * v).sum()) == pytest.approx(fd, rel=1e-6, abs=1e-9)


def test_sa_vae_refuses_estimators_whose_second_derivatives_are_wrong():
    """Up front, naming the valid ones: an estimator that drops the direct term cannot be
    differentiated twice with the MC KL; every other combination builds."""
    for name, entry in ESTIMATORS.items():
        for kl in ("analytic", "mc"):
            baseline = next(iter(entry.baselines))
            settings = MethodSettings(name="sa_vae", estimator=name, baseline=baseline, kl=kl)
            if twice_differentiable(name, kl == "mc"):
                settings.validate()
                dataclasses.replace(settings, name="semi_amortized").validate()
            else:
                with pytest.raises(ValueError, match=r"sa_vae differentiates its refinement.*"
                                                     r"Valid with kl='mc': reparam"):
                    settings.validate()
                # the first-order methods take it
                dataclasses.replace(settings, name="semi_amortized").validate()
    with pytest.raises(ValueError, match="'stl' with kl='mc'"):
        MethodSettings(name="sa_vae", estimator="stl", kl="mc").validate()


@pytest.mark.parametrize("name", ["semi_amortized", "sa_vae"])
def test_refining_inference_uses_the_heldout_settings(name):
    """A score+none-trained (M = 4) refining model infers exactly as the same model with the
    held-out settings (reparam, M = 1, analytic KL) on the same noise: held-out refinement is
    one procedure for every training estimator."""
    kl = "analytic"
    trained, x = _method(name, estimator="score", baseline="none", n_mc=4, kl=kl)
    heldout = trained.settings.heldout_settings()
    assert (heldout.estimator, heldout.n_mc, heldout.kl) == ("reparam", 1, "analytic")
    plain, _ = _method(name, heldout)
    plain.load_state_dict(trained.state_dict())
    lam, steps = trained.infer(x, member_random(*SEEDS))
    lam_plain, _ = plain.infer(x, member_random(*SEEDS))
    assert steps is None
    torch.testing.assert_close(lam, lam_plain, rtol=0, atol=0)
    # and that is not what the training estimator's refinement gives
    own = trained.local_ascent(x, trained.encoder(x).detach(), member_random(*SEEDS), STEPS)
    assert not torch.allclose(own.detach(), lam)
