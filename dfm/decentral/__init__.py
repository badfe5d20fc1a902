"""Decentralization: balanced partitions, routers, ensembles (THEORY S8-S13).

- `partition`: spherical balanced k-means with exact balance (`balance`), or balance in weight
  (`weights=`, `balance.weighted_balanced_assignment`), two-stage variant, nearest-centroid /
  balanced assignment, `Partition` save/load.
- `features`: tf-idf + TruncatedSVD text features (c-BTM); passthrough for encoder features.
- `routers`: the one router interface (`Router`: init / weights / update) and its routers: Bayes
  filter (S9), centroid top-k (S12, S13), fixed and callable weights; `learned_router`: classifier
  on noised states and its objective (S10); `temperature`: fit the centroid router's T.
- `mixing`: the mixture itself (S8): probability mixing of distributions, logit mixing
  (approximate), teacher-forced mixture scoring of observed tokens with any router (S8, S9).
- `ensemble`: the experts' posterior functions mixed at every sampler step (`PosteriorFn`).
- `decoding`: `mixture_generate` (prefill + decode) and `mixture_decode`, cached causal experts
  continued under a router (one jitted program whose length is traced).
"""
from dfm.decentral.balance import (
                                    balanced_assignment,
                                    transport,
                                    weighted_balanced_assignment,
)
from dfm.decentral.decoding import mixture_decode, mixture_generate
from dfm.decentral.ensemble import (
                                    EnsembleState,
                                    ExpertSpec,
                                    check_compatible_experts,
                                    ensemble_init_state,
                                    ensemble_posterior_fn,
)
from dfm.decentral.features import PrecomputedFeaturizer, TextFeaturizer
from dfm.decentral.learned_router import (
                                    LearnedRouter,
                                    router_loss,
                                    router_objective,
                                    train_learned_router,
)
from dfm.decentral.mixing import (
                                    MixtureScores,
                                    available_mask,
                                    available_weights,
                                    mix_log_probs,
                                    mix_logits,
                                    mix_probabilities,
                                    mixture_token_log_probs,
)
from dfm.decentral.partition import (
                                    Partition,
                                    assign,
                                    assign_balanced,
                                    balanced_kmeans,
                                    two_stage_balanced_kmeans,
)
from dfm.decentral.routers import (
                                    BayesFilterRouter,
                                    CallableRouter,
                                    CentroidRouter,
                                    FixedRouter,
                                    Router,
                                    StatelessRouter,
                                    apply_threshold,
                                    centroid_weights,
                                    check_router,
                                    oracle_weights,
                                    top_k,
                                    uniform_weights,
)
from dfm.decentral.temperature import (
                                    fit_centroid_router,
                                    fit_temperature,
                                    mixture_log_likelihood,
)

__all__ = [
    "BayesFilterRouter", "CallableRouter", "CentroidRouter", "EnsembleState", "ExpertSpec", "FixedRouter",
    "LearnedRouter", "MixtureScores", "mixture_decode", "mixture_generate", "available_mask", "available_weights", "Partition", "PrecomputedFeaturizer", "Router", "StatelessRouter",
    "TextFeaturizer", "apply_threshold", "assign", "assign_balanced", "balanced_assignment", "balanced_kmeans",
    "centroid_weights", "check_compatible_experts", "check_router", "ensemble_init_state",
    "ensemble_posterior_fn", "fit_centroid_router", "fit_temperature", "mix_log_probs", "mix_logits",
    "mix_probabilities", "mixture_log_likelihood", "mixture_token_log_probs", "oracle_weights", "router_loss",
    "router_objective", "top_k", "train_learned_router", "transport", "two_stage_balanced_kmeans",
    "uniform_weights", "weighted_balanced_assignment",
]
