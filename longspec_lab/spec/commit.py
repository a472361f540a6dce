"""Commit: keep the accepted path's KV entries, drop the rest, and advance the committed length.

During verification the target wrote the key/value of tree node i at cache slot `P + i` (P = the
committed length). After acceptance only the path root..winner is kept: its entries move to the
contiguous slots P, P+1, ..., P+n-1 and the committed length becomes P + n (LongSpec, arXiv 2502.17421,
docs/LONGSPEC.md section 1 step 6). One gather and one scatter per tensor move every layer at once;
rejected entries are simply overwritten later. The reference moves only the last layer and re-feeds
the accepted tokens to the target next step; moving all layers saves that extra work.

Both functions take device tensors with static shapes (the path is padded to D+1 entries with the
winner), so the eager loop, `torch.compile` and CUDA graphs run the same code.

Taught in: notebooks/03_one_step_slowly.ipynb (the KV commit figure).
"""

from __future__ import annotations

import torch


def commit_kv(k: torch.Tensor, v: torch.Tensor, P: torch.Tensor, path: torch.Tensor) -> None:
    """k, v [L, B, Hkv, S, D]: move slots P + path [D+1] to P + 0..D in every layer (in place).

    Entries past the accepted length n are copied too; they lie beyond the new committed length and
    are overwritten by the next step, so the shapes never depend on n."""
    dst = P + torch.arange(path.numel(), device=path.device)  # [D+1]
    src = P + path  # [D+1] accepted nodes sit at slots P + node id
    for t in (k, v):
        t.index_copy_(3, dst, t.index_select(3, src))  # gather first: src and dst may overlap


def advance(out, out_len, root, P, emitted: torch.Tensor, n: torch.Tensor) -> None:
    """Append emitted[:n] to out at out_len, make the last of them the new root, and move P and
    out_len on by n. emitted [D+1] (padding beyond n lands past out_len and is overwritten later);
    out needs D+1 spare slots at its end."""
    out.index_copy_(0, out_len + torch.arange(emitted.numel(), device=emitted.device), emitted)
    root.copy_(emitted.index_select(0, n - 1))
    P.add_(n)
    out_len.add_(n)
