"""dfm: discrete flow matching in JAX, with autoregression as a schedule and decentralized experts.

Reference implementation of Maschan, Qu, Liu (2026), "Decentralized Autoregressive Generation"
(arXiv 2601.03184). The mathematics is specified in THEORY.md (cited as "THEORY S<n>").
See docs/design.md for the module map.
"""

__version__ = "0.1.0"
