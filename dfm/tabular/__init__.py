"""Exact float64 numpy engine for discrete flow matching on small state spaces (THEORY S1-S13).

Everything is enumerated: states ``[vocab + 1]^L`` (mask token ``m = vocab``) or ``[vocab]^L``
(uniform source), joint kernels ``K[y, x]`` (column-stochastic, ``p_{t+1} = K @ p_t``), marginal
paths, posteriors, exact joint velocities (S3) and factorized kernels (S4-S7), mixtures and
routers (S8-S13), information quantities (S6, S11). It is the reference that tests of the JAX
library and ``proofs_check`` compare against. Keep vocab and length small (``M <= ~1000``).

Shapes: ``q [D]`` over data states (``D = vocab**L``), ``kappa [T + 1, L]``, paths ``[T + 1, M]``,
``posterior [M, D]``, ``coordinate_posteriors [M, L, vocab]``, kernels/velocities ``[M, M]``.
Sources: masked by default; ``source=[D]`` (x0 independent of x1, e.g. uniform) or ``coupling=[D, D]``
(``pi(x0, x1)``) on the path/posterior functions, ``with_mask=False`` on the kernel functions.

Modules: ``states`` (enumeration), ``distributions`` (random laws, schedules, couplings, kernels),
``paths`` (mixture paths, rates), ``posteriors`` (posteriors, denoisers, exact joint velocity),
``kernels`` (conditional / factorized / Euler kernels, validity, continuity), ``losses`` (DFM loss,
AR NLL, sampler likelihood), ``mixtures`` (router, top-k), ``info`` (entropy, KL, TV, MI, TC).
"""
from types import ModuleType as _ModuleType

from dfm.tabular.distributions import (
    KINDS,
    random_coupling,
    random_distribution,
    random_kappa,
    random_kind,
    random_markov_kernel,
)
from dfm.tabular.info import (
    block_total_correlation,
    chain_rule_mutual_information,
    conditional_total_correlation,
    entropy,
    joint_entropy,
    kl_divergence,
    marginal,
    mutual_information,
    next_token_conditionals,
    prefix_marginals,
    tv_distance,
)
from dfm.tabular.kernels import (
    conditional_kernel,
    conditional_kernels,
    continuity_residual_divergence,
    continuity_residual_kernel,
    coordinate_factors,
    divergence,
    euler_kernel,
    factorized_kernel,
    factorized_kernel_from_rate,
    markov_kernel_error,
    product_kernel,
    sample_distribution,
    velocity_validity_error,
)
from dfm.tabular.losses import ar_nll, dfm_loss, sampler_distribution, sampler_nll
from dfm.tabular.mixtures import mixture, route, router, top_k_renormalize
from dfm.tabular.paths import (
    conditional_path,
    joint_path_at,
    marginal_path,
    pair_path_at,
    rates,
    rates_between,
    resolve_source,
    single_conditional_path,
)
from dfm.tabular.posteriors import (
    coordinate_posteriors,
    coordinate_posteriors_from,
    coordinate_velocity,
    expected_conditional_kernel,
    joint_velocity,
    pair_posterior,
    posterior,
    posterior_at,
)
from dfm.tabular.states import (
    data_index,
    embed_data,
    enumerate_states,
    mask_index,
    num_symbols,
    point_mass,
    state_index,
)

__all__ = sorted(n for n, o in dict(globals()).items() if not n.startswith("_") and not isinstance(o, _ModuleType))
