"""Inference methods (SPEC §4): per-row optimiser state, vem's minibatching, held-out inference.

* ``RowOptimizer`` is per-row Adam / Robbins–Monro SGD: each row evolves exactly as if it had its
  own ``torch.optim`` optimiser that is stepped only when the row is in the minibatch.
* A vem step changes only the minibatch's rows of the table and of the optimiser state.
* vem's M-step gradient, scaled by N/B, averages over the minibatches of one of the trainer's
  epochs to the full-data gradient: exactly (float64 rounding) when each point's noise is fixed,
  because the minibatches partition the training set.
* Held-out inference: vem fits λ from the prior by E-steps and stops by the window rule;
  semi-amortized refinement improves on the encoder output. Checked against the closed forms of
  the linear-Gaussian model.
"""

from __future__ import annotations

import pytest
import torch

import vi.inference
from vi import linear_gaussian as lg
from vi.data import load_dataset
from vi.decoders import GaussianDecoder
from vi.inference import MethodSettings, StoppingRule, build_method
from vi.optim import RowOptimizer, robbins_monro
from vi.training import TrainConfig, Trainer

DTYPE = torch.float64

# (estimator, baseline, n_mc, kl)
ESTIMATORS = [
    ("reparam", "none", 1, "analytic"),
    ("stl", "none", 2, "mc"),
    ("score", "loo", 3, "analytic"),
    ("score", "mean", 2, "mc"),
    ("score", "cv", 3, "analytic"),
]


def _ids(cases):
    return ["-".join(map(str, c)) for c in cases]


# ----------------------------------------------------------------------------- RowOptimizer


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_row_optimizer_is_one_torch_optimizer_per_row(kind):
    """Each row follows torch.optim.Adam (or SGD with the Robbins–Monro LambdaLR) stepped only on
    the iterations that visit it: per-row moments and per-row step counts (bias correction)."""
    g = torch.Generator().manual_seed(0)
    n, p, lr = 7, 3, 0.05
    table = torch.randn(n, p, generator=g, dtype=DTYPE)
    rows = [torch.nn.Parameter(table[i].clone()) for i in range(n)]
    opt = RowOptimizer(table, kind, lr, rm_delay=3.0, rm_power=0.7)
    if kind == "adam":
        ref = [torch.optim.Adam([r], lr=lr) for r in rows]
        scheds = None
    else:
        ref = [torch.optim.SGD([r], lr=lr) for r in rows]
        scheds = [
            torch.optim.lr_scheduler.LambdaLR(o, lambda t: robbins_monro(t, 3.0, 0.7))
            for o in ref
        ]
    counts = torch.zeros(n, dtype=torch.long)
    for _ in range(12):
        idx = torch.randperm(n, generator=g)[: int(torch.randint(1, n, (1,), generator=g))]
        grad = torch.randn(len(idx), p, generator=g, dtype=DTYPE)
        opt.step(idx, grad)
        counts[idx] += 1
        for j, i in enumerate(idx.tolist()):
            rows[i].grad = grad[j].clone()
            ref[i].step()
            if scheds is not None:
                scheds[i].step()
    torch.testing.assert_close(table, torch.stack([r.detach() for r in rows]), rtol=1e-12,
                               atol=1e-12)
    assert torch.equal(opt.steps, counts)


# ------------------------------------------------------------------- vem: untouched rows


def _small_vem(optimizer: str, estimator, baseline, n_mc, kl, e_steps=2, n=40):
    g = torch.Generator().manual_seed(1)
    decoder = GaussianDecoder(6, 2, hidden=[8]).to(DTYPE)
    settings = MethodSettings(estimator=estimator, baseline=baseline, n_mc=n_mc, kl=kl,
                              optimizer=optimizer, local_optimizer=optimizer, local_lr=0.05,
                              e_steps=e_steps)
    method = build_method("vem", decoder, settings, n).to(DTYPE)
    x = torch.rand(n, 6, generator=g, dtype=DTYPE)
    return method, x, g


def _local_state(method) -> dict[str, torch.Tensor]:
    state = {"local": method.local.clone(), **method.local_opt.state_dict()}
    return {k: v.clone() for k, v in state.items()}


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize(("estimator", "baseline", "n_mc", "kl"), ESTIMATORS, ids=_ids(ESTIMATORS))
def test_vem_step_changes_only_minibatch_rows(optimizer, estimator, baseline, n_mc, kl):
    e_steps = 2
    method, x, g = _small_vem(optimizer, estimator, baseline, n_mc, kl, e_steps)
    n = x.shape[0]
    # The optimiser updates the method's own table (a checkpoint restores both at once).
    assert method.local_opt.table is method.local
    # Two warm-up epochs: every row and every row's state is non-trivial before the test step.
    for _ in range(2):
        for idx in torch.randperm(n, generator=g).split(16):
            method.train_step(x[idx], idx, g)
    before = _local_state(method)
    assert {"local", "steps"} <= set(before)
    if optimizer == "adam":
        assert {"exp_avg", "exp_avg_sq"} <= set(before)
        assert bool((before["exp_avg_sq"] > 0).all())

    idx = torch.randperm(n, generator=g)[:11]
    out = method.train_step(x[idx], idx, g)
    after = _local_state(method)

    assert out.shape == (11,) and bool(torch.isfinite(out).all())
    outside = torch.ones(n, dtype=torch.bool)
    outside[idx] = False
    for key in before:
        # bit for bit: not even a zero-gradient Adam update may reach an unvisited row
        assert torch.equal(before[key][outside], after[key][outside]), key
    assert torch.equal(after["steps"][idx], before["steps"][idx] + e_steps)
    moved = (after["local"][idx] != before["local"][idx]).any(-1)
    assert bool(moved.all()), f"rows {idx[~moved].tolist()} of the minibatch did not move"
    if optimizer == "adam":
        assert bool((after["exp_avg"][idx] != before["exp_avg"][idx]).any(-1).all())


# --------------------------------------------- vem: minibatch gradients over a trainer epoch


def _ppca_config(**changes) -> TrainConfig:
    values = dict(dataset="ppca", dataset_options=dict(data_dim=5, latent_dim=2, n=250),
                  latent_dim=2, hidden=[8], method="vem", batch_size=40, epochs=1,
                  eval_splits=["train"], dtype="float64")
    return TrainConfig.from_dict(values | changes)


@pytest.mark.parametrize(("estimator", "baseline", "n_mc", "kl"), ESTIMATORS[:3],
                         ids=_ids(ESTIMATORS[:3]))
def test_vem_minibatch_gradient_averages_to_full_gradient(monkeypatch, estimator, baseline,
                                                          n_mc, kl):
    """E_batches[(N/B) ∇_θ Σ_{n∈b} L_n] = ∇_θ Σ_n L_n over one epoch of the trainer's batches.

    θ and the table are held fixed for the epoch (the step is replaced by a probe that computes
    the M-step gradient without applying it), and point n always sees the noise ε[:, n], so the
    identity is exact: the trainer's minibatches partition {1..N}. The probe's gradient is first
    shown to be the gradient the real ``train_step`` applies.
    """
    trainer = Trainer(_ppca_config(estimator=estimator, baseline=baseline, n_mc=n_mc, kl=kl,
                                   local_lr=0.1))
    method, X = trainer.method, trainer.x["train"]
    n, bsz = X.shape[0], trainer.config.batch_size
    assert n % bsz == 0 and n // bsz > 1  # equal batches: the plain mean is the right average
    params = list(method.decoder.parameters())
    g = torch.Generator().manual_seed(3)
    eps = torch.randn(n_mc, n, 2, generator=g, dtype=DTYPE)  # point n's fixed noise ε[:, n]
    with torch.no_grad():
        method.local.copy_(0.5 * torch.randn(n, 4, generator=g, dtype=DTYPE))
    if baseline == "mean":
        method.running_mean.update(torch.tensor([-20.0]))
    current = {}

    def fixed_noise(n_mc_, batch_shape, h, **_):
        assert (n_mc_, *batch_shape, h) == tuple(current["eps"].shape)
        return current["eps"]

    monkeypatch.setattr(vi.inference, "draw_noise", fixed_noise)

    def m_step_grad(x, idx):
        """−∇_θ of the M-step loss, the minibatch mean ELBO at the table's rows."""
        current["eps"] = eps[:, idx]
        est = method.estimate(x, method.local[idx], generator=None)
        return torch.autograd.grad(est.surrogate.mean(), params), est

    # 1. The probe computes what train_step applies (at the rows after its E-steps).
    idx0 = torch.arange(bsz)
    theta0 = [p.detach().clone() for p in params]
    state0 = _local_state(method)
    current["eps"] = eps[:, idx0]
    method.train_step(X[idx0], idx0, g)
    applied = [-p.grad for p in params]
    with torch.no_grad():
        for p, t in zip(params, theta0, strict=True):
            p.copy_(t)
    probe, _ = m_step_grad(X[idx0], idx0)
    for a, b in zip(applied, probe, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # undo the E-step
        method.local.copy_(state0["local"])
    method.local_opt.load_state_dict(state0)

    # 2. One epoch of the trainer with the probe in place of the update.
    data = torch.Generator().set_state(trainer.generators["data"].get_state())
    order = torch.randperm(n, generator=data)
    seen, grads = [], []

    def probe_step(x, idx, generator):
        assert torch.equal(x, X[idx])  # the rows sent are the indexed points (STYLE §4)
        grad, est = m_step_grad(x, idx)
        seen.append(idx.clone())
        grads.append(grad)
        return est.samples.mean(0)

    monkeypatch.setattr(method, "train_step", probe_step)
    trainer.run_epoch()
    assert torch.equal(torch.cat(seen), order)  # the trainer's own seeded permutation
    assert all(len(i) == bsz for i in seen)

    current["eps"] = eps
    full = torch.autograd.grad(method.estimate(X, method.local, None).surrogate.sum(), params)
    for k, f in enumerate(full):
        scaled = torch.stack([n * gb[k] for gb in grads])  # (N/B) ∇ Σ_{n∈b} L_n = N ∇ mean_b
        torch.testing.assert_close(scaled.mean(0), f, rtol=1e-10, atol=1e-10)
        assert bool((scaled.std(0) > 0).any())  # the minibatch estimates really differ


# ------------------------------------------------------------------------ held-out inference


@pytest.fixture(scope="module")
def ppca_mle():
    """The PPCA maximum-likelihood decoder of a small ppca data set, float64."""
    ds = load_dataset("ppca", seed=0, data_dim=10, latent_dim=2, n=300)
    x, xt = ds.train.to(DTYPE), ds.test.to(DTYPE)
    W, b, s2 = lg.ppca_mle(x, 2)
    decoder = GaussianDecoder(10, 2, mean="linear", variance="learned", isotropic=True).to(DTYPE)
    decoder.set_linear_parameters(W, b, s2)
    W, b, psi = (t.detach() for t in decoder.linear_parameters())
    best = lg.elbo_closed_form(xt, lg.optimal_diagonal_posterior(xt, W, b, psi), W, b, psi)
    return decoder, x, xt, (W, b, psi), best.mean()


@pytest.mark.parametrize(("estimator", "baseline", "n_mc"),
                         [("reparam", "none", 4), ("score", "loo", 8)])
def test_vem_heldout_fit_reaches_optimal_q(ppca_mle, estimator, baseline, n_mc):
    """Held-out λ from the prior λ = 0 by E-steps (θ frozen) ends near the exact diagonal
    optimum λ*; the step count is the window rule's, and the training table is untouched."""
    decoder, x, xt, (W, b, psi), best = ppca_mle
    rule = StoppingRule(window=20, patience=3, max_steps=3000)
    settings = MethodSettings(estimator=estimator, baseline=baseline, n_mc=n_mc, local_lr=0.05,
                              heldout=rule)
    method = build_method("vem", decoder, settings, x.shape[0]).to(DTYPE)
    table = method.local.clone()
    theta = [p.detach().clone() for p in decoder.parameters()]
    lam = method.infer(xt, generator=torch.Generator().manual_seed(1))
    steps = method.last_infer_steps
    assert lam.shape == (xt.shape[0], 4) and not lam.requires_grad
    assert steps % rule.window == 0 and 2 * rule.window <= steps < rule.max_steps
    start = lg.elbo_closed_form(xt, torch.zeros_like(lam), W, b, psi).mean()
    fitted = lg.elbo_closed_form(xt, lam, W, b, psi).mean()
    assert float(best - start) > 50.0  # the prior is a poor posterior here: a real test
    # Optimisation (not MC) tolerance: constant-step Adam on noisy gradients hovers around λ*.
    assert float(best - fitted) < 0.25, float(best - fitted)
    assert torch.equal(method.local, table)
    assert all(torch.equal(p, t) for p, t in zip(decoder.parameters(), theta, strict=True))
    assert all(p.requires_grad for p in decoder.parameters())


def test_vem_infer_of_training_points_is_the_table():
    method, x, g = _small_vem("adam", "reparam", "none", 1, "analytic")
    with torch.no_grad():
        method.local.copy_(torch.randn(method.local.shape, generator=g, dtype=DTYPE))
    idx = torch.tensor([5, 0, 17])
    assert torch.equal(method.infer(x[idx], idx), method.local[idx])
    assert method.last_infer_steps is None


def test_semi_amortized_refinement_improves_encoder_output(ppca_mle):
    """K gradient-ascent steps from the encoder output, θ frozen: a higher exact ELBO per point
    than the encoder's λ (refine_lr below 2 / max posterior precision, so ascent is stable)."""
    decoder, x, xt, (W, b, psi), _ = ppca_mle
    settings = MethodSettings(refine_steps=20, refine_lr=0.005, n_mc=4)
    torch.manual_seed(0)
    method = build_method("semi_amortized", decoder, settings, x.shape[0]).to(DTYPE)
    theta = [p.detach().clone() for p in method.parameters()]
    lam0 = method.encoder(xt).detach()
    lam = method.infer(xt, generator=torch.Generator().manual_seed(2))
    before = lg.elbo_closed_form(xt, lam0, W, b, psi)
    after = lg.elbo_closed_form(xt, lam, W, b, psi)
    assert float((after - before).mean()) > 10.0
    assert float((after > before).double().mean()) > 0.95
    assert all(torch.equal(p, t) for p, t in zip(method.parameters(), theta, strict=True))
    assert all(p.requires_grad for p in method.parameters())
