"""Decentralization: balanced partitions, routers, ensembles (THEORY S8-S13).

- `partition`: spherical balanced k-means with exact balance (`balance`), two-stage variant,
  nearest-centroid / balanced assignment, `Partition` save/load.
- `features`: tf-idf + TruncatedSVD text features (c-BTM); passthrough for encoder features.
- `routers`: weights over experts `[batch, K]`: Bayes filter (S9), centroid top-k (S12, S13);
  `learned_router`: classifier on noised states (S10); `temperature`: fit the centroid router's T.
- `ensemble`: probability mixing (exact, S8), logit mixing (approximate), ensemble PosteriorFn.
"""
from dfm.decentral.balance import balanced_assignment, transport
from dfm.decentral.ensemble import (EnsembleState, ExpertSpec, check_compatible_experts,
                                    ensemble_init_state, ensemble_posterior_fn, mix_log_probs,
                                    mix_logits, mix_probabilities)
from dfm.decentral.features import PrecomputedFeaturizer, TextFeaturizer
from dfm.decentral.learned_router import LearnedRouter, router_loss, train_learned_router
from dfm.decentral.partition import (Partition, assign, assign_balanced, balanced_kmeans,
                                     two_stage_balanced_kmeans)
from dfm.decentral.routers import (BayesFilterRouter, CentroidRouter, apply_threshold,
                                   centroid_weights, oracle_weights, top_k, uniform_weights)
from dfm.decentral.temperature import fit_temperature

__all__ = [
    "BayesFilterRouter", "CentroidRouter", "EnsembleState", "ExpertSpec", "LearnedRouter", "Partition",
    "PrecomputedFeaturizer", "TextFeaturizer", "apply_threshold", "assign", "assign_balanced",
    "balanced_assignment", "balanced_kmeans", "centroid_weights", "check_compatible_experts",
    "ensemble_init_state", "ensemble_posterior_fn", "fit_temperature", "mix_log_probs",
    "mix_logits", "mix_probabilities", "oracle_weights", "router_loss", "top_k", "train_learned_router", "transport",
    "two_stage_balanced_kmeans", "uniform_weights",
]
