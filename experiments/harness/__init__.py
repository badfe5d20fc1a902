"""Evaluation harnesses on exported decentralized models (`dfm.DecentralizedModel`).

- `experiments.harness.lm_eval_model`: lm-evaluation-harness model ``dfm`` for text exports
  (``pip install -e ".[eval]"``); its CLI: ``python -m experiments.harness.lm_eval run --model dfm ...``.
- `experiments.harness.lmms_eval_model`: lmms-eval model ``dfm`` for image-text exports
  (the ``eval-mm`` extra); registered through the ``lmms_eval.models`` entry point
  (`lmms_eval_manifest`), so lmms-eval's own CLI finds it: ``python -m lmms_eval --model dfm ...``.
- `experiments.harness.backend`: the requests answered with `DecentralizedModel` (no harness needed).

Nothing here imports a harness until its model is used: ``import experiments`` never needs them.
"""
from __future__ import annotations


def lmms_eval_manifest():
    """The ``lmms_eval.models`` entry point (pyproject.toml): lmms-eval's manifest of model ``dfm``
    (`experiments.harness.lmms_eval_model.DecentralizedLMMS`, a "simple" model), imported lazily."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="dfm", simple_class_path="experiments.harness.lmms_eval_model.DecentralizedLMMS")
