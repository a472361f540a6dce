"""Row-wise top-k values for the draft's beam level: the Triton kernel on the GPU, torch.topk elsewhere.

A beam level (LongSpec, arXiv 2502.17421; `spec/draft.py: beam_level`) first keeps the top-w keys of
each parent row, [n, V] int64 -> [n, w]. `torch.topk` does that on the GPU as a radix select that
cost 47 us on the H200 for 16 x 4096 keys; `kernels/row_topk.py` takes the maximum w times instead,
one program per row. Both give the same values when every row's keys are distinct, which beam_level's
keys are (their low 32 bits hold the flat index), so the switch never changes a tree.

`row_topk_values(x, k)` picks:
    "auto"    the kernel when x is on CUDA and Triton is installed, else torch.topk (the default)
    "torch"   torch.topk(x, k, dim=1).values always: the readable fallback
    "triton"  the kernel always; on the CPU it needs TRITON_INTERPRET=1 (the tests use this)
`flat_topk_values(x, k)` is the beam's whole selection, the k largest of all n x V keys, in two
stages: each row's top-min(k, V), then the top-k of those n x min(k, V) winners (the global top-k lies
among them). torch.topk's own top-k of a few hundred values costs two more kernels (a radix select and
a sort, 8 us on the H200), so on the kernel path (the same choice as `row_topk_values`) both stages are
the kernel, as one op: `kernels/row_topk.py: flat_topk`. Its first stage may split each row into
narrower chunks, whose winners all go to the second stage; the width is a second switch,
LONGSPEC_TOPK_FIRST_BLOCK (a power of two, default 1,024: with the bitonic network the fastest width on the H200,
data/results/beam_select_h200.json; with repeated maxima 512 was, 11.3 us captured for 16 x 4096 keys against 12.5
us with one chunk per row, data/results/row_topk_flat_h200.json).

`beam_keys(logits, parent_scores, w)` is a beam level's whole selection from the draft's logits in ONE launch
(`kernels/beam_select.py`: log-softmax, parent scores, keys and both top-k passes, the last program to finish
doing the second), or None where its switch LONGSPEC_BEAM_SELECT does not send the level there: "auto" (the
default: the kernel on CUDA for the shapes it takes: float32 scores, V <= 16384, at most 4096 candidates), "off"
(the definition always), "on" (also on the CPU under TRITON_INTERPRET=1, the tests). The caller then runs the
definition (`spec/draft.py: beam_level_from_logits`). H200, one call, the same tokens (2026-12-05,
data/results/e2e_ab_beam_select_h200.json against e2e_ab_base_beam_h200.json): the default tree 12,851 ->
13,098 tokens/s, chain gamma 5 13,933 -> 14,285; a tree level's stage graph 66-71 -> 57-61 us. How that launch's
chunk programs rank their tokens is the kernel's own switch, LONGSPEC_BEAM_CHUNK_KEYS (default "logits_rows": each
chunk ranks its logits and the last program folds the rows' sums; a 16-parent level's selection 11.2 -> 9.4 us of
an H100 step, data/results/e2e_ab_beam_chunk_*_h100.json, and 9.4 -> 6.9 us since its last program merges the
rows' sorted runs, data/results/e2e_ab_beam_last_*_h100.json).

`head_beam_keys(h, head, parent_scores, w)` goes one step further back: the level's LM head and its whole selection
in ONE launch (`kernels/head_select.py`: every program computes a vocabulary chunk's logits for every parent and
keeps each row's w largest, the last to arrive folds the partial log-sum-exps and selects), from the draft's last
hidden rows h [n, hidden] and the head [V, hidden], so the n x V logits are never written. Its switch
LONGSPEC_HEAD_SELECT: "off" (the default: the head and then `beam_keys`; on the H200 the one launch was slower for
a tree level, 45-115 us against 10 for the two, and level for a chain: e2e_ab3_head_select_h200.json), "auto" (the
kernel on CUDA for the shapes it takes: at most 64 parents, a hidden size up to 256, 8,192 candidates), "on"
(also on the CPU under TRITON_INTERPRET=1). None means the caller makes the logits
(`spec/draft.py: beam_level_from_hidden`).

`beam_level_into(logits, parent_scores, width, tree, lo, plo)` goes one step further on: the same launch as
`beam_keys` also writes the level into the tree's buffers (its last program decodes the w keys into tokens, parents
and scores, and each new node's mask row from its parent's), so the two small kernels of `TreeBuffers.add_level`
after each level are gone. Its switch LONGSPEC_BEAM_WRITE: "auto" (the default: on
CUDA wherever `beam_keys` takes the level and the mask rows fit the last program), "off" (the level written by
`add_level`), "on" (also on the CPU under TRITON_INTERPRET=1). Timed on an H100 in two calls (2026-12-06,
data/results/e2e_ab_beam_write_h100.log), identical tokens: the default tree's level 44.8 -> 43.6 and 45.0 -> 43.1
us, its tokens/s +1.7% and +2.7%, chain gamma 5 +2.0% and +3.2%. It returns False where the caller must write
the level itself.

How each kernel pass selects is a third switch, LONGSPEC_TOPK_ALGO: "bitonic" (Triton's bitonic top-k network),
"max" (k repeated maxima) or "auto" (the default: the network where Triton has it, except that a flat or row
selection over more than 16 x 4,096 keys, such as a Llama-3 vocabulary's level, takes the maxima in every pass:
34 us against 70 for 16 x 128,256 keys on an H100, data/results/row_topk_8b_size_rule_h100.json); all give the
same values.

The switch is the environment variable LONGSPEC_ROW_TOPK, read at import into `ROW_TOPK`; set
`LONGSPEC_ROW_TOPK=torch` to force torch.topk everywhere, or assign `ROW_TOPK` at run time.

Taught in: notebooks/02_tree_shapes.ipynb
"""

from __future__ import annotations

import os

import torch

from longspec_lab.ops.switches import HAS_TRITON, checked

CHOICES = ("auto", "torch", "triton")
ROW_TOPK = os.environ.get("LONGSPEC_ROW_TOPK", "auto")  # one of CHOICES (module docstring)
BEAM_CHOICES = ("auto", "off", "on")
BEAM_SELECT = os.environ.get("LONGSPEC_BEAM_SELECT", "auto")  # one of BEAM_CHOICES (module docstring)
HEAD_SELECT = os.environ.get("LONGSPEC_HEAD_SELECT", "off")  # one of BEAM_CHOICES (module docstring)
BEAM_WRITE = os.environ.get("LONGSPEC_BEAM_WRITE", "auto")  # one of BEAM_CHOICES (module docstring)


def _use_kernel(x: torch.Tensor) -> bool:
    """Whether the switch (module docstring) sends x to the Triton kernel."""
    choice = checked("LONGSPEC_ROW_TOPK", ROW_TOPK, CHOICES)
    return choice == "triton" or (choice == "auto" and x.is_cuda and HAS_TRITON)


def row_topk_values(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest values of every row of x [rows, V], descending: [rows, k]. The rows' values must
    be distinct for the kernel to equal torch.topk (kernels/row_topk.py)."""
    if _use_kernel(x):
        from longspec_lab.kernels.row_topk import row_topk

        return row_topk(x, k)
    return torch.topk(x, k, dim=1).values


def flat_topk_values(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest values of all of x [n, V], descending: [k] (distinct values, as row_topk_values)."""
    n, V = x.shape
    if not 1 <= k <= n * V:
        raise ValueError(f"k must be in [1, n * V] = [1, {n * V}], got {k}; ask for at most as many values as x holds")
    if _use_kernel(x):
        from longspec_lab.kernels.row_topk import flat_topk

        return flat_topk(x, k)  # both stages in one op
    first = torch.topk(x, min(k, V), dim=1).values  # [n, min(k, V)]
    return torch.topk(first.reshape(-1), k).values  # [k]


def beam_keys(logits: torch.Tensor, parent_scores: torch.Tensor, width: int) -> torch.Tensor | None:
    """A beam level's `width` best keys [width] int64 from logits [n, V] and parent_scores [n] in one launch, or
    None where LONGSPEC_BEAM_SELECT (module docstring) leaves the level to the definition."""
    choice = checked("LONGSPEC_BEAM_SELECT", BEAM_SELECT, BEAM_CHOICES)
    if choice == "off" or parent_scores.dtype != torch.float32 or logits.dim() != 2:
        return None
    if choice == "auto" and not (logits.is_cuda and HAS_TRITON):
        return None
    from longspec_lab.kernels.beam_select import beam_select, plan

    n, V = logits.shape
    if not plan(n, V, width)["fits"]:
        return None
    return beam_select(logits, parent_scores, width)


def head_beam_keys(h: torch.Tensor, head: torch.Tensor, parent_scores: torch.Tensor, width: int) -> torch.Tensor | None:
    """A beam level's `width` best keys [width] int64 from the draft's last hidden rows h [n, K], its LM head
    [V, K] and parent_scores [n], the head and the selection in one launch; or None where LONGSPEC_HEAD_SELECT
    (module docstring) leaves the level to the head and `beam_keys`."""
    choice = checked("LONGSPEC_HEAD_SELECT", HEAD_SELECT, BEAM_CHOICES)
    if choice == "off" or parent_scores.dtype != torch.float32 or h.dim() != 2 or head.dtype != h.dtype:
        return None
    if choice == "auto" and not (h.is_cuda and HAS_TRITON):
        return None
    if torch.is_grad_enabled() and (h.requires_grad or head.requires_grad):
        return None  # the kernel has no backward: training keeps the logits
    from longspec_lab.kernels.head_select import head_select, plan

    n, K = h.shape
    if not plan(n, head.shape[0], K, width)["fits"]:
        return None
    return head_select(h, head, parent_scores, width)


def beam_write_takes(logits: torch.Tensor, parent_scores: torch.Tensor, width: int, tree: dict) -> bool:
    """Whether LONGSPEC_BEAM_WRITE (module docstring) and the shapes send a level to `beam_level_into`."""
    choice = checked("LONGSPEC_BEAM_WRITE", BEAM_WRITE, BEAM_CHOICES)
    if choice == "off" or (choice == "auto" and not (logits.is_cuda and HAS_TRITON)):
        return False
    if checked("LONGSPEC_BEAM_SELECT", BEAM_SELECT, BEAM_CHOICES) == "off" or parent_scores.dtype != torch.float32:
        return False
    if logits.dim() != 2 or tree["scores"].dtype != torch.float32:
        return False
    from longspec_lab.kernels.beam_select import plan, write_fits

    n, V = logits.shape
    return plan(n, V, width)["fits"] and write_fits(width, tree["tokens"].shape[0])


def beam_level_into(logits, parent_scores, width: int, tree: dict, lo: int, plo: int) -> None:
    """A beam level's selection and the level written into the tree buffers `tree` (tokens, parents, scores, anc) at
    nodes lo .. lo + width - 1, whose parents are the nodes from plo on, in one launch (where `beam_write_takes`)."""
    from longspec_lab.kernels.beam_select import beam_select_into

    beam_select_into(logits, parent_scores, width, tree, lo, plo)
