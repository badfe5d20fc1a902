"""Logits parity of our models with transformers on tiny random checkpoints (needs torch CPU).

`python -m dfm.hf.parity` builds, for each architecture, a tiny random transformers model, saves
it with `save_pretrained`, loads it with `dfm.hf.load_pretrained`, and prints a table of

- import: max |our logits - transformers' logits| on the same inputs (float32),
- round trip: the same after exporting ours with `dfm.hf.save_pretrained` and loading that
  directory back in transformers,
- greedy: whether 16 greedy tokens (`greedy_generate` vs `generate(do_sample=False)`) are identical.

Ours runs at `matmul_precision="highest"` (the import default): full float32 matmuls, so the
table reads the same on a GPU / TPU backend as on CPU (docs/accelerators.md).

The tests (tests/dfm/hf/test_parity.py, tests/dfm/hf/test_vision_parity.py) assert on the same functions
(`dfm.hf.parity_tools`, `dfm.hf.vision_parity`).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from dfm.hf import vision_parity
from dfm.hf.parity_tools import ParityResult, text_parity

def all_results(directory: str | Path) -> list[ParityResult]:
    """Every architecture's row: text, then vision / multimodal."""
    directory = Path(directory)
    rows = [text_parity("llama", directory / "llama", sharded=True),
            text_parity("qwen2", directory / "qwen2", tie=True)]
    return rows + vision_parity.all_results(directory)


def format_table(rows: list[ParityResult]) -> str:
    """A Markdown table of `rows`."""
    lines = ["| architecture | import max abs dlogits | round trip max abs dlogits | greedy 16 tokens equal |",
             "|---|---|---|---|"]
    for r in rows:
        greedy = "n/a" if r.greedy_equal is None else ("yes" if r.greedy_equal else "NO")
        note = f" ({r.note})" if r.note else ""
        lines.append(f"| {r.architecture}{note} | {r.import_max_abs:.3g} | {r.roundtrip_max_abs:.3g} | {greedy} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.dir:
        print(format_table(all_results(args.dir)))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            print(format_table(all_results(tmp)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
