"""Greedy acceptance of a verification pass: the definition, or its tail in one Triton launch.

Greedy verification (LongSpec, arXiv 2502.17421; `spec/verify.py: greedy_accept`) turns the target's logits at
the N tree nodes into the accepted path: each node's argmax, which nodes match their parent's prediction, the
deepest node whose whole path matches, its path and tokens, and the step's acceptance counts. Compiled, that is six
small launches after the LM head. `kernels/greedy_accept.py` does all of it in one (one program per node's argmax,
the last to arrive walking the tree in registers), bit for bit the same outputs: they are comparisons, not sums.

`fused_greedy_accept(logits, buf, out, D, R)` runs the kernel into the decoder's buffers and returns True, or
returns False where the switch LONGSPEC_GREEDY_ACCEPT leaves the pass to the definition (the caller then runs it):
    "auto"  the kernel on CUDA, for trees of at most 128 nodes (`kernels/greedy_accept.py: MAX_NODES`); the
            default since the decoder's A/B below
    "off"   the definition always
    "on"    the kernel always where it fits, also on the CPU under TRITON_INTERPRET=1 (the tests)
The switch is read at import into `GREEDY_ACCEPT`; assign it at run time to flip it.

On the GPU machine (torch 2.11) compiling the verify stage with the kernel first stalled for minutes: torch 2.11's
Inductor describes each op it lowers by its implicit fallback, printing every argument in full, for a log line it
builds whether or not it is shown, and this op's logits print the verify's whole IR, recursively
(`bench.compile_watch --ir-printers` found the caller). With that description cut to one line
(`decoding.graphs.compile_stage` does so) the stage compiles in seconds.

Timed in the decoder on H100s (2026-12-06, two calls, `h200_speed --only e2e` with the switch off and on;
data/results/e2e_ab_greedy_accept2_h100.json, e2e_ab_greedy_accept3_h100.json and their bases): every method's
tokens the same; chain gamma 5 and the tree [1,2,4,4,4,4,4] 1.0-1.3% faster in both calls (2-4.5 us a verify), the
69-node default tree level (+0.6% and -0.3%). The kernel's first form, whose last program worked over [N, N]
tiles, had made the default tree's verify 50 us longer (e2e_ab_greedy_accept_h100.json); see
kernels/greedy_accept.py. Since its last program walks the tree depth by depth instead of reading the whole mask
(LONGSPEC_GREEDY_TAIL, the same day) the default tree's verify is 8 us shorter as well: 178.9 -> 171.1 us
(e2e_ab_greedy_tail_walk_h100.json against its base).

Taught in: notebooks/03_one_step_slowly.ipynb
"""

from __future__ import annotations

import os

import torch

from longspec_lab.ops.switches import HAS_TRITON, checked

CHOICES = ("auto", "off", "on")
GREEDY_ACCEPT = os.environ.get("LONGSPEC_GREEDY_ACCEPT", "auto")  # one of CHOICES (module docstring)


def fused_greedy_accept(logits: torch.Tensor, buf, out: dict, D: int, R: int) -> bool:
    """Greedy acceptance of logits [N, V] on the tree buffers `buf` (tokens, parents, depths, anc) in one launch,
    into `out` (`kernels.greedy_accept.greedy_accept`'s buffers; stats added to): True, or False where
    LONGSPEC_GREEDY_ACCEPT (module docstring) leaves it to the definition."""
    choice = checked("LONGSPEC_GREEDY_ACCEPT", GREEDY_ACCEPT, CHOICES)
    if choice == "off" or (choice == "auto" and not (logits.is_cuda and HAS_TRITON)):
        return False
    from longspec_lab.kernels.greedy_accept import fits, greedy_accept

    if not fits(logits.shape[0], D):
        return False
    greedy_accept(logits, buf.tokens, buf.parents, buf.depths, buf.anc, out, D, R)
    return True
