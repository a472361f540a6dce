"""Triton kernels of longspec_lab, importable as ``longspec_lab.kernels``.

- ``tree_attention``: split-KV tree-verification attention for LongSpec (arXiv 2502.17421), with its
  float64 PyTorch reference and an H200 benchmark (``bench_tree_attention``).

Nothing is imported eagerly: Triton decides at ``@triton.jit`` time whether it interprets kernels
(``TRITON_INTERPRET=1``, CPU) or compiles them (CUDA), so set that variable before importing
``longspec_lab.kernels.tree_attention``.
"""
