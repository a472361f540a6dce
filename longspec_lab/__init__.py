"""longspec_lab: a teaching and measurement toolkit for LongSpec tree speculative decoding (arXiv 2502.17421)."""

__version__ = "0.1.0"
