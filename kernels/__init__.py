"""Triton kernels of longspec_lab, importable as ``longspec_lab.kernels``.

- ``tree_attention``: split-KV tree-verification attention for LongSpec (arXiv 2502.17421), with its
  float64 PyTorch reference and an H200 benchmark (``bench_tree_attention``).
- ``ordered_attention``: attention that sums every query row's keys in one canonical order (prefix,
  then its visible block keys), so batch-invariant decoding gives the same bits in a tree and in an AR
  step; its PyTorch definition and a benchmark against the tree kernel sit in the same file.
- ``row_topk``: the k largest values of every row by k repeated maxima (exact for distinct keys), the
  draft's beam level on the GPU instead of torch.topk's radix select; registered as
  ``torch.ops.longspec.row_topk``, with torch.topk as its reference and a benchmark against it. Both
  top-k stages of a beam level run on it.
- ``beam_select``: a beam level's whole selection in one launch (the log-softmax, the parents' scores, every
  chunk's top-k, and the top-w of those by the last program to arrive), instead of Inductor's keys kernel and
  ``row_topk``'s two passes; registered as ``torch.ops.longspec.beam_select``, with the PyTorch definition and a
  benchmark against it compiled (``LONGSPEC_BEAM_SELECT``, ``longspec_lab/ops/topk.py``); ``beam_select_into``
  is the same launch writing the level into the tree's buffers as well (``LONGSPEC_BEAM_WRITE``).
- ``head_select``: a beam level's LM head and its whole selection in one launch (every program a vocabulary chunk's
  logits for every parent, each row's partial log-sum-exp and its w largest logits; the last to arrive scores and
  selects), so the logits are never written; registered as ``torch.ops.longspec.head_select``, with the PyTorch
  definition and a benchmark against the two launches it replaces (``LONGSPEC_HEAD_SELECT``,
  ``longspec_lab/ops/topk.py``).
- ``greedy_accept``: a verification pass's greedy tail in one launch (every node's argmax, then the last program to
  arrive walks the tree: verified and accepted nodes, the winner's path, the emitted tokens and the step's acceptance
  counts), instead of six Inductor kernels; registered as ``torch.ops.longspec.greedy_accept``, writing the decoder's
  buffers in place, with a node-by-node PyTorch reference and a benchmark (``LONGSPEC_GREEDY_ACCEPT``,
  ``longspec_lab/ops/accept.py``).
- ``norm_linear``: RMSNorm, a projection and its epilogue (SiLU product, residual) in one kernel, with its
  float64 definition and a benchmark against the PyTorch ops; registered as ``torch.ops.longspec.norm_linear``
  and used by the models for small weights on CUDA (``LONGSPEC_NORM_LINEAR``, ``longspec_lab/ops/linear.py``).
- ``rope``: the RoPE cos/sin tables of explicit positions and a decoding step's cache slots in one launch, so that a
  compiled step makes them once for all layers (Inductor otherwise copies them for every layer's fused q/k/v op);
  registered as ``torch.ops.longspec.rope_tables``, with its PyTorch definition and a benchmark against it
  (``LONGSPEC_ROPE_TABLES``, ``longspec_lab/ops/rope.py``).
- ``masked_attention``: attention of a few query rows over a short cache under a boolean mask in one launch
  (online softmax, the GQA heads stacked in one row tile, the keys split over programs and merged by the last
  to arrive): the draft's sliding-window self-attention; registered as ``torch.ops.longspec.masked_attention``,
  with its float64 definition and a benchmark against the PyTorch forms (``LONGSPEC_MASKED_ATTN``).
- ``sweep_tree_attention``: times every plan of the tree kernel (split count, row tile, tile config, fused
  or launched merge) on the few-row calls a decoding step makes, each checked against float64 first;
  the planner's defaults come from it.
- ``compile_check``: compiles every kernel variant for a Hopper GPU ahead of time, without a GPU, which
  catches what the CPU interpreter cannot (``python -m longspec_lab.kernels.compile_check``).

Nothing is imported eagerly: Triton decides at ``@triton.jit`` time whether it interprets kernels
(``TRITON_INTERPRET=1``, CPU) or compiles them (CUDA), so set that variable before importing
``longspec_lab.kernels.tree_attention`` (or any kernel module).
"""

if __name__ == "kernels":
    # Imported as top-level `kernels`: Python found this folder because the repository root is on sys.path
    # (`python -m ...` or pytest run from the root). That name belongs to the `kernels` package, which
    # transformers (5.2x) imports for its hub kernels. Where that package is installed, hand the name over
    # to it, so transformers keeps working from the repository root; this folder stays longspec_lab.kernels.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _elsewhere = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root]
    _spec = _machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is not None and _spec.loader is not None:
        _module = _util.module_from_spec(_spec)
        _sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds
        _spec.loader.exec_module(_module)
