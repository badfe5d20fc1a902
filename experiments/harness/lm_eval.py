"""``python -m experiments.harness.lm_eval ARGS``: lm-evaluation-harness's own CLI (``lm_eval ARGS``)
with the ``dfm`` model registered first (`experiments.harness.lm_eval_model`); every argument is
the harness's, e.g. ``run --model dfm --model_args pretrained=DIR --tasks TASKS``."""
from __future__ import annotations

from lm_eval.__main__ import cli_evaluate

import experiments.harness.lm_eval_model  # noqa: F401  (registers "dfm")


def main() -> None:
    """Hand over to `lm_eval.__main__.cli_evaluate` (reads `sys.argv`) with ``dfm`` registered."""
    cli_evaluate()


if __name__ == "__main__":
    main()
