"""lmms-eval model ``dfm``: an image-text export (the multimodal job's ``<run>/decentralized``,
`dfm.DecentralizedModel` with ``images=``) as an `lmms_eval.api.model.lmms` ("simple" model).

lmms-eval finds it through the ``lmms_eval.models`` entry point (pyproject.toml,
`experiments.harness.lmms_eval_manifest`), so its own CLI runs it once dfm is installed::

    python -m lmms_eval --model dfm --model_args pretrained=runs/mllm/decentralized,batch_size=8 \\
        --tasks TASKS

model_args: ``pretrained`` (required), ``top_k``, ``available`` (indices separated by ``|``),
``batch_size`` (default 8), ``seed``, ``is_greedy``, ``dtype``, ``matmul_precision`` (as the
lm-eval model, `experiments.harness.lm_eval_model`). Each request's visuals (``doc_to_visual(doc)``,
PIL images) must be exactly one image: it is made RGB, centre-cropped to a square and resized
bicubic to the towers' ``image_size`` (`experiments.harness.backend.pil_to_uint8`).
``loglikelihood`` and ``generate_until`` map as `experiments.harness.backend` describes;
``generate_until_multi_round`` is not supported.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from lmms_eval.api.model import lmms

from experiments.harness.backend import Backend, open_model, pil_to_uint8
from experiments.harness.backend import batch_size as batch_size_arg


def _flatten(visuals: Any) -> list:
    if visuals is None:
        return []
    if isinstance(visuals, (list, tuple)):
        return [v for item in visuals for v in _flatten(item)]
    return [visuals]


class DecentralizedLMMS(lmms):
    """`dfm.DecentralizedModel` (image-text experts) behind lmms-eval's `lmms` interface (module doc)."""

    is_simple = True

    def __init__(self, pretrained: str, top_k: int | None = None, available: Any = None, batch_size: Any = 8,
                 seed: int = 0, is_greedy: bool = True, dtype: str | None = None,
                 matmul_precision: str = "highest", device: Any = None, max_batch_size: Any = None, **unused: Any):
        super().__init__()
        del device, max_batch_size            # JAX places the experts; batches are batch_size
        self.model = open_model(pretrained, multimodal=True, unused=unused, top_k=top_k, available=available,
                                dtype=dtype, matmul_precision=matmul_precision,
                                known="pretrained, top_k, available, batch_size, seed, is_greedy, dtype, "
                                      "matmul_precision")
        self.backend = Backend(self.model, batch_size=batch_size_arg(batch_size), seed=seed, greedy=is_greedy)
        self.image_size = self.model.multimodal_config.vision.image_size

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """``model_args`` win over the CLI's ``--batch_size`` / ``--device``."""
        from lmms_eval.utils import simple_parse_args_string

        args = simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    def _image(self, doc_to_visual, doc_id, task, split, index: int) -> np.ndarray:
        """The request's one image as uint8 `[S, S, 3]` (ValueError naming the request otherwise)."""
        visuals = _flatten(doc_to_visual(self.task_dict[task][split][doc_id]))
        if len(visuals) != 1:
            raise ValueError(f"requests[{index}] ({task} doc {doc_id}): expected exactly one image, got "
                             f"{len(visuals)} (the experts read one image per text)")
        return pil_to_uint8(visuals[0], self.image_size)

    def loglikelihood(self, requests) -> list:
        """`(log p(continuation | context, image), is_greedy)` per request (wrapped, see below)."""
        pairs, images = [], []
        for i, req in enumerate(requests):
            context, target, doc_to_visual, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            pairs.append((context, target if isinstance(target, str) else str(target(doc))))
            images.append(self._image(doc_to_visual, doc_id, task, split, i))
        out = self.backend.loglikelihood(pairs, images=images)
        try:    # lmms-eval 0.7.3's evaluator turns any response but str / GenerationResult into str(response)
            from lmms_eval.api.instance import GenerationResult   # (unwrap_generation_output): wrap the pairs
        except ImportError:
            return out
        return [GenerationResult(text=pair) for pair in out]

    def generate_until(self, requests) -> list[str]:
        args, images = [], []
        for i, req in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            args.append((context, gen_kwargs))
            images.append(self._image(doc_to_visual, doc_id, task, split, i))
        return self.backend.generate_until(args, images=images)

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("generate_until_multi_round: not supported by the dfm model (one question per image)")
