"""What each finding's effect measures, in the words the README's generated findings block uses
(``experiments.readme``): finding key → (label, format), the format ``iv`` (mean [95 % CI]),
``iv1``/``iv4`` (with 1 or 4 decimals) or ``ratio`` (a log10 ratio shown as a ratio). A finding
without an entry reads "effect"."""

from __future__ import annotations

__all__ = ["EFFECTS"]

#: per finding (key): what its effect measures, and whether it is a log10 ratio shown as a ratio
EFFECTS: dict[str, tuple[str, str]] = {
    "score_vs_reparam_variance": ("gradient variance ratio score+none / reparam", "ratio"),
    "variance_ratio_vs_latent_dim": ("slope of the log10 variance ratio on log10 H", "iv"),
    "score_baselines": ("variance reduction no baseline / baseline", "ratio"),
    "stl_near_optimum": ("variance ratio reparam / STL", "ratio"),
    "amortization_gap_train_vs_test": ("test − train amortization gap of the VAE, nats", "iv"),
    "refinement_reduces_amortization_gap": ("reduction of the test amortization gap, nats",
                                            "iv"),
    "refinement_improves_test_elbo": ("test ELBO gain over the VAE, nats", "iv"),
    "beats_factor_analysis_digits": ("test ELBO − factor analysis, nats", "iv"),
    "beats_factor_analysis_mnist5k": ("test ELBO − factor analysis, nats", "iv"),
    "test_time_encoder_start": ("ELBO from the encoder − from the prior at equal E-steps, nats",
                                "iv"),
    "score_training_cost_epochs": ("ELBO(reparam) − ELBO(score) at equal epochs, nats", "iv"),
    "score_training_cost_seconds": ("ELBO(reparam) − ELBO(score) at equal seconds, nats", "iv"),
    "vem_e_steps_epochs": ("gain over the fewest E-steps at equal epochs, nats", "iv"),
    "vem_e_steps_seconds": ("gain over the fewest E-steps at equal seconds, nats", "iv"),
    "sa_vae_vs_semi_amortized": ("SA-VAE − semi-amortized test ELBO, nats", "iv"),
    "more_refinement_steps": ("test ELBO gain from the fewest to the most refinement steps, "
                              "nats", "iv"),
    "posterior_collapse": ("inactive units of the VAE at the largest H", "iv1"),
    "active_units_by_method": ("active units, method − VAE, at the largest H", "iv1"),
    "richer_family_closes_approximation_gap": ("diagonal − richer family's test approximation "
                                               "gap, nats", "iv"),
    "amortization_gap_grows_with_family": ("richer − diagonal family's test amortization gap, "
                                           "nats", "iv"),
    "vem_lead_by_family": ("change of vem − VAE test L[q_φ] from the diagonal to the richer "
                           "family, nats", "iv"),
    "full_covariance_exact_on_ppca": ("0.01 − full-covariance approximation gap on ppca, nats",
                                      "iv4"),
    "decoders_by_log_likelihood": ("test log p(x) by AIS, method − VAE, nats", "iv"),
    "iwae_below_ais": ("AIS − IWAE test log p(x), nats", "iv"),
    "test_time_cost": ("vem's held-out E-steps against one encoder pass", "iv"),
    "iwae_inference_snr_falls": ("signed slope of log SNR on log K, inference, reparam", "iv"),
    "iwae_decoder_snr_grows": ("slope of log SNR on log K, decoder, reparam", "iv"),
    "dreg_inference_snr_grows": ("slope of log SNR on log K, inference, DReG", "iv"),
    "stl_biased_on_iwae": ("STL's squared relative bias on the IWAE gradient", "iv4"),
    "vimco_vs_score": ("variance ratio score+none / VIMCO", "ratio"),
    "tighter_bound_better_decoder": ("test log p(x), K-trained − ELBO-trained, nats", "iv"),
    "tighter_bound_worse_encoder": ("test log p(x) − L[q_φ], K-trained − ELBO-trained, nats",
                                    "iv"),
}
