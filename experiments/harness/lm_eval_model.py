"""lm-evaluation-harness model ``dfm``: a text export (`dfm.DecentralizedModel`) as an `lm_eval.api.model.LM`.

Importing this module registers the model (lm-eval 0.4.13 has no entry-point group for models), so
run the harness's CLI through ``python -m experiments.harness.lm_eval`` (which imports it first) or
call ``lm_eval.simple_evaluate(model="dfm", ...)`` after ``import experiments.harness.lm_eval_model``::

    python -m experiments.harness.lm_eval run --model dfm \\
        --model_args pretrained=runs/default/export/decentralized,top_k=1,batch_size=8 \\
        --tasks lambada_openai,wikitext

model_args: ``pretrained`` (the `save_decentralized` directory, required), ``top_k`` (override the
centroid router's top-k), ``available`` (expert indices separated by ``|``), ``batch_size`` (texts per
call, default 8; ``--batch_size`` of the CLI too), ``routing`` ("context" or "text",
`experiments.harness.backend.Backend`), ``max_length`` (rolling window, default the experts'
context), ``seed`` (sampling), ``is_greedy`` (false skips the extra forward pass), ``dtype``,
``matmul_precision``. The request types map as `experiments.harness.backend` describes.
"""
from __future__ import annotations

from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from experiments.harness.backend import Backend, open_model
from experiments.harness.backend import batch_size as batch_size_arg

NAME = "dfm"


@register_model(NAME)
class DecentralizedLM(LM):
    """`dfm.DecentralizedModel` behind lm-eval's `LM` interface (module doc)."""

    def __init__(self, pretrained: str, top_k: int | None = None, available: Any = None, batch_size: Any = 8,
                 routing: str = "context", max_length: int | None = None, seed: int = 0, is_greedy: bool = True,
                 dtype: str | None = None, matmul_precision: str = "highest", device: Any = None,
                 max_batch_size: Any = None, **unused: Any):
        super().__init__()
        del device, max_batch_size               # JAX places the experts; batches are batch_size
        self.model = open_model(pretrained, multimodal=False, unused=unused, top_k=top_k, available=available,
                                dtype=dtype, matmul_precision=matmul_precision,
                                known="pretrained, top_k, available, batch_size, routing, max_length, seed, "
                                      "is_greedy, dtype, matmul_precision")
        self.backend = Backend(self.model, batch_size=batch_size_arg(batch_size), routing=routing,
                               max_length=max_length, seed=seed, greedy=is_greedy)
        self.pretrained = str(pretrained)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """As `LM.create_from_arg_string`, but ``model_args`` win over the CLI's ``--batch_size`` /
        ``--device`` (the base class raises on a key given twice)."""
        from lm_eval.utils import simple_parse_args_string

        args = simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [tuple(r.args) for r in requests]
        out = self.backend.loglikelihood(pairs)
        for pair, res in zip(pairs, out):
            self.cache_hook.add_partial("loglikelihood", pair, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [r.args[0] for r in requests]
        out = self.backend.loglikelihood_rolling(texts)
        for text, res in zip(texts, out):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), res)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        args = [(r.args[0], r.args[1]) for r in requests]
        out = self.backend.generate_until(args)
        for arg, res in zip(args, out):
            self.cache_hook.add_partial("generate_until", arg, res)
        return out

    @property
    def tokenizer_name(self) -> str:
        return self.pretrained.replace("/", "__")

    def get_model_info(self) -> dict:
        """Recorded in the results' ``config`` (lm-eval calls it when present)."""
        m = self.model
        return {"model_source": NAME, "pretrained": self.pretrained, "num_experts": m.num_experts,
                "available": [int(i) for i in m.available.nonzero()[0]], "top_k": m.top_k,
                "router": None if m.router is None else type(m.router).__name__,
                "routing": self.backend.routing, "context_length": m.context_length}
