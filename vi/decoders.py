"""The shared Gaussian decoder p_θ(x | z) = N(x; μ_θ(z), diag σ²_θ(z)) and its prior
(docs/model.md).

One class covers every variant of the study:

==============  =====================  ==================================================
``mean``        μ_θ(z)                 ``variance``
==============  =====================  ==================================================
``mlp``         MLP(z)                 ``fixed`` | ``learned`` (per dim) | ``heteroscedastic``
``linear``      W z + b                ``fixed`` | ``learned`` isotropic s² (PPCA) or
                                       per-dimension Ψ (factor analysis)
==============  =====================  ==================================================

A variance floor keeps the likelihood bounded: σ² = σ²_min + exp(ρ) for learned variances, with
ρ unconstrained (``vi.data.variance_floor`` chooses σ²_min from the data's quantization).
Every variant computes log p(x | z) through one path, ``torch.distributions``'
``Independent(Normal(μ, σ), 1)``.

The decoder is stacked (``vi.nets``): K members with their own θ. Shapes: data x [K, B, D];
latents z [..., K, B, H] (any leading sample axes, e.g. M Monte Carlo samples) give
log p(x | z) of shape [..., K, B]. K = 1 is the ordinary model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.distributions import Independent, Normal

from vi.families import diag_normal, standard_log_prob, standard_normal
from vi.nets import ACTIVATIONS, StackedMLP

__all__ = ["ACTIVATIONS", "MEANS", "VARIANCES", "GaussianDecoder", "log_joint"]

MEANS = ("mlp", "linear")
VARIANCES = ("fixed", "learned", "heteroscedastic")


def _choice(kind: str, value: str, valid: Sequence[str]) -> str:
    if value not in valid:
        raise ValueError(f"unknown {kind} {value!r}; valid: {', '.join(valid)}")
    return value


class _MemberFirstGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (member axis first): the
    gradient of a caller's ``mean(0)`` over samples arrives as a stride-0 view in sample-first
    order, and the element-wise backward of the log-density would inherit that order, so the
    reductions into σ² would sum in an order that depends on the number of members."""

    generate_vmap_rule = True  # torch.func (per-draw gradients) batches it like any op

    @staticmethod
    def forward(t: Tensor) -> Tensor:
        return t.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()


def _member_first_grad(t: Tensor) -> Tensor:
    return _MemberFirstGrad.apply(t)


class GaussianDecoder(nn.Module):
    """p_θ(x | z) = N(x; μ_θ(z), diag σ²_θ(z)) with prior p(z) = N(0, I_H), K members.

    Args:
        data_dim: D.
        latent_dim: H.
        members: K, the number of stacked copies (each with its own θ).
        mean: ``"mlp"`` or ``"linear"`` (μ = W z + b).
        variance: ``"fixed"`` (σ² = ``fixed_var``), ``"learned"`` (free parameter) or
            ``"heteroscedastic"`` (second MLP head gives log σ²(z); ``mlp`` only).
        isotropic: with ``learned`` variance, one shared s² (PPCA) instead of per-dimension Ψ.
        hidden: hidden widths of the MLP.
        activation: one of ``ACTIVATIONS``.
        var_floor: σ²_min ≥ 0 added to every learned variance.
        fixed_var: the constant σ² of the ``fixed`` variant.
        init_var: initial σ² of the ``learned`` variants.
        generators: one per member for the initialisation (default: torch's global RNG).
    """

    def __init__(
        self,
        data_dim: int,
        latent_dim: int,
        *,
        members: int = 1,
        mean: str = "mlp",
        variance: str = "learned",
        isotropic: bool = False,
        hidden: Sequence[int] = (256,),
        activation: str = "tanh",
        var_floor: float = 1e-4,
        fixed_var: float = 1.0,
        init_var: float = 1.0,
        generators: Sequence[torch.Generator] | None = None,
    ) -> None:
        super().__init__()
        if int(data_dim) < 1 or int(latent_dim) < 1:
            raise ValueError(
                f"data_dim and latent_dim must be positive; got D={data_dim}, H={latent_dim}"
            )
        if not var_floor >= 0 or not math.isfinite(var_floor):
            raise ValueError(f"var_floor must be a finite number >= 0; got {var_floor}")
        if not (math.isfinite(fixed_var) and fixed_var > 0) or not (
                math.isfinite(init_var) and init_var > var_floor):
            raise ValueError(
                f"fixed_var must be > 0 and init_var > var_floor (both finite); got "
                f"fixed_var={fixed_var}, init_var={init_var}, var_floor={var_floor}"
            )
        if any(int(w) < 1 for w in hidden):
            raise ValueError(f"hidden widths must be positive; got {list(hidden)}")
        self.mean_kind = _choice("decoder mean", mean, MEANS)
        self.variance_kind = _choice("decoder variance", variance, VARIANCES)
        _choice("activation", activation, tuple(ACTIVATIONS))
        if mean == "linear" and variance == "heteroscedastic":
            raise ValueError("a linear decoder has no heteroscedastic variant; use fixed/learned")
        self.data_dim, self.latent_dim = int(data_dim), int(latent_dim)
        self.isotropic = bool(isotropic)
        self.var_floor, self.fixed_var = float(var_floor), float(fixed_var)
        self.init_var = float(init_var)

        out = 2 * data_dim if variance == "heteroscedastic" else data_dim
        sizes = [latent_dim, out] if mean == "linear" else [latent_dim, *map(int, hidden), out]
        extra = {}
        if variance == "learned":
            extra["raw_var"] = (1 if isotropic else data_dim,)
        self.net = StackedMLP(members, sizes, activation, extra)
        self.reset_parameters(generators)

    @property
    def members(self) -> int:
        return self.net.members

    @property
    def params(self):
        """The decoder's ``FlatParameters`` (one leaf [K, P]: the MLP or W, b, and ρ)."""
        return self.net.params

    @torch.no_grad()
    def init_from_data(self, x: Tensor) -> None:
        """Start every member near the no-latent Gaussian of its training data x [K, N, D]: the
        output bias at the data's mean, learned variances at its per-dimension variance
        (floored; one shared value if isotropic) and, for an MLP, the last layer's weights
        scaled by 0.01 (small enough that μ_θ(z) starts within 1 % of the mean, not zero, so
        the symmetry between latent directions stays broken). The model then starts from the
        reference every latent-variable model should beat, instead of spending its first
        hundreds of steps shrinking σ² from ``init_var``."""
        p = self.params.views()
        last = len(self.net.sizes) - 2
        if self.mean_kind == "mlp":
            p[f"w{last}"].mul_(0.01)
        mean = x.mean(1).to(p[f"b{last}"])
        p[f"b{last}"][..., :self.data_dim].copy_(mean)
        if self.variance_kind == "learned":
            var = x.var(1, correction=0).to(p["raw_var"])
            if self.isotropic:
                var = var.mean(-1, keepdim=True)
            floor = max(self.var_floor, 1e-12)
            p["raw_var"].copy_(torch.log((var - self.var_floor).clamp_min(floor)))

    @torch.no_grad()
    def reset_parameters(self, generators: Sequence[torch.Generator] | None = None) -> None:
        """Initialise every member (member k from ``generators[k]``)."""
        for k in range(self.members):
            g = None if generators is None else generators[k]
            if g is None:
                g = torch.Generator().manual_seed(int(torch.randint(2**62, ()).item()))
            self.net.reset_member(k, g)
            if self.variance_kind == "learned":
                self.params.fill(k, "raw_var", torch.full(
                    self.params.shapes["raw_var"], math.log(self.init_var - self.var_floor)))

    # -- the model ---------------------------------------------------------------------------
    def mean_and_variance(self, z: Tensor, views: dict[str, Tensor] | None = None
                          ) -> tuple[Tensor, Tensor]:
        """(μ_θ(z), σ²_θ(z)) for z [..., K, R, H]: each [..., K, R, D] (σ² broadcastable)."""
        if z.shape[-1] != self.latent_dim or z.dim() < 3 or z.shape[-3] != self.members:
            raise ValueError(f"decoder expects z [..., K={self.members}, R, H={self.latent_dim}];"
                             f" got {tuple(z.shape)}")
        p = self.params.views() if views is None else views
        lead = z.shape[:-3]
        k, r = z.shape[-3], z.shape[-2]
        flat_z = z if not lead else z.movedim(-3, 0).reshape(k, -1, self.latent_dim)
        out = self.net(flat_z, p)
        if lead:
            out = out.reshape(k, *lead, r, out.shape[-1]).movedim(0, -3)
        if self.variance_kind == "heteroscedastic":
            mean, raw = out.chunk(2, dim=-1)
            return mean, self.var_floor + torch.exp(raw)
        if self.variance_kind == "learned":
            var = self.var_floor + torch.exp(p["raw_var"])  # [K, 1 or D]
            return out, var.unsqueeze(-2)
        return out, out.new_full((1,), self.fixed_var)

    def distribution(self, z: Tensor, views: dict[str, Tensor] | None = None) -> Independent:
        """p_θ(x | z) as ``Independent(Normal(μ, σ), 1)`` with batch shape z.shape[:-1]."""
        mean, var = self.mean_and_variance(z, views)
        return diag_normal(mean, var.sqrt().expand_as(mean))

    def log_likelihood(self, x: Tensor, z: Tensor,
                       views: dict[str, Tensor] | None = None) -> Tensor:
        """log p_θ(x | z): x [K, B, D], z [..., K, B, H] → [..., K, B]."""
        if x.shape[-1] != self.data_dim:
            raise ValueError(f"decoder expects x [..., {self.data_dim}]; got x {tuple(x.shape)}")
        mean, var = self.mean_and_variance(z, views)
        lead = mean.dim() - 3
        if lead > 0:
            # member axis first, where the network computed it: the gradient of a per-member
            # parameter (σ²) sums over samples and points in one contiguous block per member,
            # in the same order whatever the number of members (no ensemble-mate changes its
            # rounding)
            k = mean.shape[-3]
            mean = mean.movedim(-3, 0)
            var = (var.movedim(-3, 0) if var.dim() == mean.dim()
                   else var.reshape(k, *([1] * lead), *var.shape[-2:]) if var.dim() == 3
                   else var)
            x = x.reshape(k, *([1] * lead), *x.shape[-2:])
        # the log-density of ``distribution(z)``, without building an Independent each step
        out = Normal(mean, var.sqrt(), validate_args=False).log_prob(x).sum(-1)
        return _member_first_grad(out).movedim(0, -2) if lead > 0 else out

    def prior(self, like: Tensor) -> Independent:
        """p(z) = N(0, I_H)."""
        return standard_normal(self.latent_dim, like)

    # -- linear decoders ---------------------------------------------------------------------
    def linear_parameters(self) -> tuple[Tensor, Tensor, Tensor]:
        """(W [K, D, H], b [K, D], Ψ [K, D]) of a linear decoder (for the closed forms)."""
        if self.mean_kind != "linear":
            raise ValueError("linear_parameters() needs a decoder with mean='linear'")
        p = self.params.views()
        zero = p["w0"].new_zeros(self.members, 1, self.latent_dim)
        _, var = self.mean_and_variance(zero)
        return p["w0"].transpose(-1, -2), p["b0"], var[:, 0].expand(self.members, self.data_dim)

    @torch.no_grad()
    def set_linear_parameters(self, W: Tensor, b: Tensor, psi: Tensor | float) -> None:
        """Load (W [(K,) D, H], b [(K,) D], Ψ) into a linear decoder with learned variance."""
        if self.mean_kind != "linear" or self.variance_kind != "learned":
            raise ValueError("set_linear_parameters() needs mean='linear', variance='learned'")
        p = self.params.views()
        p["w0"].copy_(torch.as_tensor(W).transpose(-1, -2).expand_as(p["w0"]))
        p["b0"].copy_(torch.as_tensor(b).expand_as(p["b0"]))
        psi = torch.as_tensor(psi, dtype=p["raw_var"].dtype, device=p["raw_var"].device)
        if self.isotropic and psi.dim() and psi.shape[-1] == self.data_dim:
            if not bool((psi == psi[..., :1]).all()):
                raise ValueError("an isotropic decoder needs one noise variance for every "
                                 "dimension")
            psi = psi[..., :1]
        psi = psi.expand_as(p["raw_var"])
        if bool((psi <= self.var_floor).any()):
            raise ValueError(f"noise variance must exceed the floor {self.var_floor}")
        p["raw_var"].copy_(torch.log(psi - self.var_floor))


def log_joint(decoder: GaussianDecoder, x: Tensor, z: Tensor,
              views: dict[str, Tensor] | None = None) -> Tensor:
    """log p_θ(x, z) = log p_θ(x | z) + log p(z): x [K, B, D], z [..., K, B, H] → [..., K, B]."""
    return decoder.log_likelihood(x, z, views) + standard_log_prob(z)
