"""dfm: discrete flow matching in JAX, with autoregression as a schedule and decentralized experts.

Reference implementation of Maschan, Qu, Liu (2026), "Decentralized Autoregressive Generation"
(arXiv 2601.03184). The mathematics is in docs/theory.md (cited as "THEORY S<n>");
docs/design.md maps each concept to a module:

- ``dfm.schedules``: kappa schedulers and per-position discrete schedules (AR, any-order, block).
- ``dfm.paths``: mixture probability paths (mask / uniform source).
- ``dfm.velocities``: conditional and posterior velocities, validity (S1), continuity (S2).
- ``dfm.samplers``: ``lax.scan`` samplers (discrete-time factorized, continuous-time Euler).
- ``dfm.losses``: weighted denoiser cross-entropy, generalized KL, AR NLL.
- ``dfm.autoregressive``: a causal LM as a denoiser / cached posterior function.
- ``dfm.inference``: one causal model on observed tokens: teacher-forced log-probs, prefill.
- ``dfm.prompts``: prompt layouts of image-text models (LLaVA v1, chat templates, image tokens).
- ``dfm.tabular``: exact float64 enumeration engine (the reference for tests and ``proofs_check``).
- ``dfm.decentral``: balanced k-means partitions, routers, ensembles (S8-S13).
- ``dfm.models``, ``dfm.train``: NNX decoders and the one training loop.
- ``dfm.sharding``: meshes, logical-axis rules, multi-host initialization.
- ``dfm.hf``: HF checkpoints in and out (Llama, Qwen2, CLIP, LLaVA, InternVL; decentralized directories).
- ``dfm.api``: ``DecentralizedModel`` (also ``dfm.DecentralizedModel``): a saved decentralized
  model as one object with ``route`` / ``score`` / ``generate`` on raw text.

Submodules are imported on first attribute access, so ``import dfm`` stays cheap.
"""
import importlib

__version__ = "0.1.0"

_SUBMODULES = ("checks", "schedules", "paths", "velocities", "samplers", "losses", "autoregressive",
               "inference", "prompts", "tabular", "decentral", "models", "train", "sharding", "hf", "io",
               "progress", "api")
# `DecentralizedModel` is importable from here (`from dfm import DecentralizedModel`) but documented in
# `dfm.api`: pdoc cannot follow a lazily resolved class listed in `__all__`.
__all__ = list(_SUBMODULES)


def __getattr__(name):
    if name == "DecentralizedModel":          # the public API of saved decentralized models
        from dfm.api import DecentralizedModel
        return DecentralizedModel
    if name in _SUBMODULES:
        return importlib.import_module(f"dfm.{name}")
    raise AttributeError(f"module 'dfm' has no attribute {name!r}")
