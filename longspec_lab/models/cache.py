"""Preallocated static KV cache (gpt-fast style), written in place.

One tensor per K and V holds every layer: [L, B, Hkv, S, D]. A forward writes a block of new
keys at slots [start, start + T). After tree verification only the accepted nodes are kept:
`commit` moves their entries to the contiguous slots after the prefix with ONE gather per
tensor, for all layers at once (LongSpec §1 step 6), and rejected entries are simply
overwritten later.

Taught in: notebooks/03_one_step_slowly.ipynb
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        num_layers: int,
        batch: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype=torch.float32,
        device="cpu",
    ):
        shape = (num_layers, batch, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [L, B, Hkv, S, D]
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0  # committed tokens
        # index_put_ coordinates of (layer, batch, head) for writes at device-tensor slots, built once
        L, B, H = num_layers, batch, num_kv_heads
        self._layer_idx = torch.arange(L, device=device).view(L, 1, 1, 1)  # [L, 1, 1, 1]
        self._bh_idx = (torch.arange(B, device=device)[:, None, None], torch.arange(H, device=device)[None, :, None])

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def reset(self) -> None:
        self.length = 0

    def check_room(self, start: int, n: int) -> None:
        if start < 0 or start + n > self.max_len:
            raise ValueError(
                f"KV cache overflow: writing {n} tokens at slot {start} needs {start + n} slots but "
                f"the cache holds {self.max_len}; allocate a larger cache (max_len) or generate fewer tokens"
            )

    def write(self, layer: int, start, k: torch.Tensor, v: torch.Tensor) -> None:
        # k, v [B, Hkv, T, D] -> slots [start, start+T) of this layer. `start` may instead be a
        # device tensor of the T slots (static shapes for CUDA graphs): then an index_copy
        T = k.shape[2]
        if isinstance(start, torch.Tensor):
            # one index_put_ on the whole cache tensor, not on the view self.k[layer]: a compiled graph
            # then scatters the T slots in place, where a mutated view made Inductor copy the layer
            idx = (self._layer_idx[layer], *self._bh_idx, start[None, None, :])  # broadcast to [B, H, T]
            self.k.index_put_(idx, k)
            self.v.index_put_(idx, v)
            return
        self.k[layer, :, :, start : start + T] = k
        self.v[layer, :, :, start : start + T] = v

    def commit(self, src_slots: torch.Tensor, dst_start: int) -> None:
        """Move the entries at `src_slots` [n] (ascending or not) to [dst_start, dst_start + n)
        in every layer with one gather + one copy per tensor; length becomes dst_start + n."""
        n = src_slots.numel()
        self.check_room(dst_start, n)
        idx = src_slots.to(self.k.device)
        for t in (self.k, self.v):
            t[:, :, :, dst_start : dst_start + n] = t.index_select(3, idx)  # gather, then write
        self.length = dst_start + n
