"""A verification pass's greedy tail in one launch: each node's argmax, the accepted path, its tokens and the counts.

After the target's pass over a draft tree (LongSpec, arXiv 2502.17421, greedy verification; `spec/verify.py:
greedy_accept`), greedy acceptance needs, from the logits [N, V] of the N tree nodes:

    preds[i]    = argmax_v logits[i, v]                          the target's next token after node i's path
    verified[i] = preds[parent(i)] == token(i)  (the root: true)
    accepted[i] = verified at i and at every ancestor of i      (a row of the tree mask)
    winner      = the deepest accepted node, the lowest index among equals
    path[d]     = the winner's ancestor at depth d (d <= D; past the winner's depth, the winner)
    n           = depth(winner) + 1                              tokens the step emits: emitted[d] = preds[path[d]]

and the decoder adds one step's acceptance counts (`spec/verify.py: acceptance_stats`: per depth, offered and
reached; per sibling rank, offered and accepted). Compiled, that definition is six launches on the H200 after the
LM head (an argmax, then five fused reductions and copies: 14 us of a default-tree step's 391, where the AR step's
argmax and copy take 2.7; data/results/profile_h200.json, `step_timeline`), each a round trip through memory for
a few hundred bytes.

Here one program owns one node's row of logits:

    1. the row's argmax in blocks of BLOCK_V (the first index of the largest value, as torch.argmax; a NaN
       counts as the largest), written to preds
    2. an arrival ticket (acquire/release, as kernels/beam_select.py): the last program to arrive sees every
       row's argmax, and it alone
    3. reads the tree (tokens, parents, depths, every row's argmax; at most MAX_NODES nodes) and computes
       verified, accepted, the winner, the path, n and the emitted tokens, and adds the step's counts to the
       running statistics, then puts the ticket back to 0 for the next launch or replay. A gather by node id (the
       argmax at each parent, the winner's mask row) is a load from L2; the counts are taken per path node
       ([D + 1, N] tiles), not per pair of nodes. `accepted` comes depth by depth (TAIL_FORM "walk", the
       default): depth d's nodes read their parents' flags, which depth d - 1 stored, D short rounds of a load
       and a barrier; or (TAIL_FORM "tile") from the whole [N, N] tree mask as one register tile of bytes, a
       node accepted where no node of its mask row is unverified: one step, but N x N byte loads (16 KiB at 128
       nodes), which made the last program cost 11.6 us at 69 nodes against 6.1 for the walk.

Measured alone on an H100 (data/results/greedy_accept_h100.json, 2026-12-06): the form before this one, whose last
program gathered through [N, N] comparison tiles and counted sibling ranks over every pair of nodes (255 registers
a thread at 128 nodes, 4 KiB of shared memory), took 35.4 us for the default tree's 69 nodes, 5.5 us for 17 and
4.6 us for a chain of 5, against 2.1 us for the argmax alone compiled; in the decoder the default tree's verify
went 174 -> 224 us with it (data/results/e2e_ab_greedy_accept_h100.json). This form compiles to 78 registers and no
shared memory for sm_90 (`python -m longspec_lab.kernels.compile_check --only greedy`).

Every output is an integer or a bool computed by comparisons, so the kernel gives the definition's outputs bit for
bit (no rounding is involved). `greedy_accept_reference` is an independent definition in plain PyTorch with Python
loops (a walk down the tree, node by node); the tests hold the kernel to it and to spec/verify.py's vectorised
definition. `greedy_accept` checks its inputs and calls the registered op `torch.ops.longspec.greedy_accept`, which
writes the decoder's buffers in place and which torch.compile(fullgraph=True) keeps as one opaque op. The switch
that sends the decoder's verify stage here is LONGSPEC_GREEDY_ACCEPT (`ops/accept.py`). `main` times the kernel
against the argmax alone, compiled (the first of the definition's launches), on a verification's shapes:

    python -m longspec_lab.kernels.greedy_accept --shapes "4,16,16,16,16;1,2,3,4,2,1,3;1,1,1,1,1,1,1"

Taught in: notebooks/03_one_step_slowly.ipynb
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from longspec_lab.kernels.launch import launch_args, tickets

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # fixed when the kernel below is defined
MAX_NODES = 128  # the last program holds the [N, N] tree mask and the rank comparison in registers
BLOCK_V = 2048  # logits a program reads per step of its argmax walk (2 blocks for the embedded model's vocabulary)
NUM_WARPS = 8  # the last program's [N, N] tiles: 64 entries a thread at 128 nodes
# how the last program finds the accepted nodes: "walk" (depth by depth, the default since 2026-12-06) or "tile"
# (the [N, N] mask): alone on an H100, 6.1 against 11.6 us for the default tree's 69 nodes, 5.7 against 6.1 for 63,
# 4.6 against 4.8 for 24, 4.6 against 4.2 for a chain of 5 (data/results/greedy_accept_forms_h100.json); in the
# decoder the default tree's verify 178.9 -> 171.1 us, chains level (e2e_ab_greedy_tail_walk_h100.json)
TAIL_FORM = os.environ.get("LONGSPEC_GREEDY_TAIL", "walk")
_FORMS = ("tile", "walk")


def _tail_form() -> str:
    """TAIL_FORM checked (from LONGSPEC_GREEDY_TAIL; the benchmark's --forms assigns it): the accepted nodes from
    the tree mask's [N, N] tile ("tile"), or depth by depth, each depth gathering its parents' flags from memory
    ("walk"). Both give the definition's outputs bit for bit; they differ in the last program's work."""
    if TAIL_FORM not in _FORMS:
        raise ValueError(
            f"LONGSPEC_GREEDY_TAIL / greedy_accept.TAIL_FORM = {TAIL_FORM!r} is not one of {', '.join(_FORMS)}; "
            "unset it (default walk) or pick one of those"
        )
    return TAIL_FORM


def _num_warps() -> int:
    """NUM_WARPS checked (the benchmark's --warps assigns it): 1, 2, 4, 8 or 16 warps a program."""
    if isinstance(NUM_WARPS, bool) or NUM_WARPS not in (1, 2, 4, 8, 16):
        raise ValueError(f"greedy_accept.NUM_WARPS = {NUM_WARPS!r} is not 1, 2, 4, 8 or 16")
    return NUM_WARPS


@triton.jit
def _greedy_accept_kernel(
    LOGITS,  # [N, V] the target's logits at each tree node (fp16, bf16 or fp32), unit column stride
    TOKENS,  # [N] int64 the nodes' tokens (node 0 = the root)
    PARENTS,  # [N] int64 each node's parent (-1 for the root)
    DEPTHS,  # [N] int64 each node's depth (the root 0)
    ANC,  # [N, N] uint8 (a bool tensor's bytes) the tree mask: row i marks node i and its ancestors
    PREDS,  # [N] int64 out: the argmax of each row
    VERIFIED,  # [N] uint8 out: the node's token is the target's argmax at its parent
    ACCEPTED,  # [N] uint8 out: the node and all its ancestors are verified
    PATH,  # [D + 1] int64 out: the winner's ancestor at each depth, padded with the winner
    N_ACC,  # [1] int64 out: depth(winner) + 1
    EMITTED,  # [D + 1] int64 out: preds along the path (padded as the path)
    STATS,  # [2D + 2R] int64 in/out: the step's acceptance counts are added (spec/verify.py: acceptance_stats)
    TICKET,  # int32 [1] arrival ticket, zero between launches
    N,  # tree nodes (grid axis 0)
    V,  # vocabulary
    stride_l,  # row stride of LOGITS, in elements
    D: tl.constexpr,  # the tree's depth
    R: tl.constexpr,  # the widest level (sibling ranks counted)
    BLOCK_V: tl.constexpr,  # logits per step of the argmax walk (a power of two)
    N_PAD: tl.constexpr,  # a power of two >= N: the last program's node tile
    D_PAD: tl.constexpr,  # a power of two >= D + 1
    K_PAD: tl.constexpr,  # a power of two >= 2D + 2R
    USE_PDL: tl.constexpr,  # programmatic dependent launch (kernels/launch.py): wait, then let the next start
    WALK: tl.constexpr = False,  # accepted by a walk over depths (TAIL_FORM "walk"), not from the [N, N] mask tile
):
    if USE_PDL:  # before any other memory access, in every program (kernels/launch.py)
        tl.extra.cuda.gdc_wait()  # the kernel before this one (the LM head) has finished and its writes are visible
        tl.extra.cuda.gdc_launch_dependents()  # the kernel after this one may start, and waits in turn
    row = tl.program_id(0)
    base = LOGITS + row.to(tl.int64) * stride_l
    # 1. the row's argmax: per block the largest value and its first index; a later block wins only when larger
    offs_v = tl.arange(0, BLOCK_V)
    best = tl.full([], float("-inf"), tl.float32)
    best_i = tl.full([], 0, tl.int32)
    for v0 in range(0, V, BLOCK_V):
        x = tl.load(base + v0 + offs_v, mask=v0 + offs_v < V, other=float("-inf")).to(tl.float32)
        x = tl.where(x != x, float("inf"), x)  # NaN: torch.argmax returns the first NaN, which this takes as the max
        m = tl.max(x, 0)
        i = tl.min(tl.where(x == m, offs_v, BLOCK_V), 0)  # the first index of the block's maximum
        take = (m > best) | (v0 == 0)  # the first block always (a row of -inf: index 0, as torch)
        best_i = tl.where(take, v0 + i, best_i)
        best = tl.where(take, m, best)
    tl.store(PREDS + row, best_i.to(tl.int64))
    # 2. the last program to arrive has every row's argmax
    tl.debug_barrier()  # every store of this program is issued before its ticket moves
    arrived = tl.atomic_add(TICKET, 1, sem="acq_rel", scope="gpu")
    if arrived == N - 1:
        # 3. acceptance over the whole tree, in registers
        idx = tl.arange(0, N_PAD)  # [N_PAD] node ids
        ok = idx < N
        # the loads that depend on nothing this program computes, issued together
        tok = tl.load(TOKENS + idx, mask=ok, other=-1)
        par = tl.load(PARENTS + idx, mask=ok, other=-1)
        dep = tl.load(DEPTHS + idx, mask=ok, other=0)
        pr = tl.load(PREDS + idx, mask=ok, other=-1, cache_modifier=".cg")  # [N_PAD] each row's argmax
        kk = tl.arange(0, K_PAD)
        k_ok = kk < 2 * D + 2 * R
        old = tl.load(STATS + kk, mask=k_ok, other=0)
        # a gather by node id is a load (the rows' argmaxes are in memory, visible after the ticket), not a
        # comparison over an [N, N] tile: at 128 nodes such tiles held 64 int64 a thread and spilled
        at_parent = tl.load(PREDS + par, mask=ok & (par >= 0), other=-1, cache_modifier=".cg")  # [N_PAD]
        verified = ((at_parent == tok) | (idx == 0)) & ok
        if WALK:
            # accepted depth by depth: a node is accepted when it is verified and its parent is accepted. Each
            # depth's flags go to ACCEPTED, where the next depth gathers them by parent id (D short rounds, no tile)
            accepted = (idx == 0) & ok
            tl.store(ACCEPTED + idx, accepted.to(tl.uint8), mask=ok)
            for d in range(1, D + 1):
                tl.debug_barrier()  # the flags this program's threads stored for depth d - 1 are visible to all
                at_d = ok & (dep == d)
                up = tl.load(ACCEPTED + par, mask=at_d, other=0)  # [N_PAD] the parent's flag
                accepted = accepted | (at_d & verified & (up != 0))
                tl.store(ACCEPTED + idx, accepted.to(tl.uint8), mask=at_d)
        else:
            # every row of the tree mask at once: [N_PAD, N_PAD] bytes
            anc = tl.load(ANC + idx[:, None] * N + idx[None, :], mask=ok[:, None] & ok[None, :], other=0) != 0
            broken = anc & (verified[None, :] == 0)  # an unverified node among a row's ancestors (or itself)
            accepted = (tl.max(broken.to(tl.int8), 1) == 0) & ok
        key = tl.where(accepted, dep * N + (N - 1 - idx), -1)  # deepest, then lowest index
        top = tl.max(key, 0)
        win = (N - 1) - top % N
        n_acc = top // N + 1
        line = tl.load(ANC + win * N + idx, mask=ok, other=0) != 0  # [N_PAD] the winner's mask row
        d = tl.arange(0, D_PAD)  # [D_PAD] depths
        at = line[None, :] & (dep[None, :] == d[:, None]) & ok[None, :]  # [D_PAD, N_PAD] one node per depth on it
        path = tl.where(tl.max(at.to(tl.int8), 1) > 0, tl.sum(tl.where(at, idx[None, :], 0), 1), win)
        d_ok = d <= D
        on = path[:, None] == idx[None, :]  # [D_PAD, N_PAD] the path's node at each depth
        emitted = tl.sum(tl.where(on, pr[None, :], 0), 1)  # [D_PAD] preds[path]
        tl.store(VERIFIED + idx, verified.to(tl.uint8), mask=ok)
        tl.store(ACCEPTED + idx, accepted.to(tl.uint8), mask=ok)
        tl.store(PATH + d, path, mask=d_ok)
        tl.store(EMITTED + d, emitted, mask=d_ok)
        tl.store(N_ACC, n_acc.to(tl.int64))
        # the step's counts, per path node (depth d < n_acc) rather than per tree node: the nodes offered are the
        # path nodes' children, and the nodes accepted are the path nodes below the root
        real = d < n_acc  # [D_PAD]
        kids = tl.sum(((par[None, :] == path[:, None]) & ok[None, :]).to(tl.int32), 1)  # [D_PAD] children
        kids = tl.where(real, kids, 0)
        up = tl.sum(tl.where(on, par[None, :], 0), 1)  # [D_PAD] the path node's parent
        before = (par[None, :] == up[:, None]) & (idx[None, :] < path[:, None]) & ok[None, :]
        rank = tl.sum(before.to(tl.int32), 1)  # [D_PAD] the path node's index among its parent's children
        k = kk[:, None]  # [K_PAD, 1] the count each row makes, over the path's depths [1, D_PAD]
        dd = d[None, :]
        hit = tl.where(
            k < D,
            (dd == k) & (kids[None, :] > 0),  # depth k + 1 offered: the path node at depth k has children
            tl.where(
                k < 2 * D,
                (dd == 0) & (k - D < n_acc - 1),  # depth k - D + 1 reached, counted once
                tl.where(
                    k < 2 * D + R,
                    kids[None, :] > k - 2 * D,  # rank k - 2D offered: under each path node with more children
                    (dd >= 1) & real[None, :] & (rank[None, :] == k - 2 * D - R),  # rank accepted
                ),
            ),
        )
        counts = tl.sum(hit.to(tl.int64), 1)  # [K_PAD]
        tl.store(STATS + kk, old + counts, mask=k_ok)
        tl.atomic_xchg(TICKET, 0)


# ----------------------------------------------------------------------------- the reference, in plain PyTorch


def greedy_accept_reference(logits, tokens, parents, depths, anc, D: int, R: int) -> dict:
    """Greedy acceptance written out node by node, on the CPU: the outputs the kernel writes (`preds`,
    `verified`, `accepted`, `path`, `n_acc`, `emitted`) and the step's counts `stats` [2D + 2R] (entries: depth
    1..D offered, depth 1..D reached, rank 0..R-1 offered, rank 0..R-1 accepted). Independent of spec/verify.py:
    ancestors are found by walking `parents`, not from the mask; `anc` is only checked to agree with them."""
    logits, tokens, parents, depths = (t.detach().cpu() for t in (logits, tokens, parents, depths))
    N = tokens.numel()
    preds = logits.float().argmax(-1)  # float32 holds every fp16 / bf16 value exactly: the same first maximum
    tok, par, dep, pr = tokens.tolist(), parents.tolist(), depths.tolist(), preds.tolist()

    def ancestors(i):  # i, its parent, ..., the root
        out = [i]
        while par[out[-1]] >= 0:
            out.append(par[out[-1]])
        return out

    mask = anc.detach().cpu().bool()
    for i in range(N):
        row = torch.zeros(N, dtype=torch.bool)
        row[ancestors(i)] = True
        assert torch.equal(mask[i], row), f"the tree mask's row {i} does not mark node {i} and its ancestors"
    verified = [i == 0 or pr[par[i]] == tok[i] for i in range(N)]
    accepted = [all(verified[a] for a in ancestors(i)) for i in range(N)]
    win = max((i for i in range(N) if accepted[i]), key=lambda i: (dep[i], -i))
    line = ancestors(win)[::-1]  # root .. winner
    path = line + [win] * (D + 1 - len(line))
    n = len(line)
    offered = [i for i in range(1, N) if par[i] in line]  # the children of the path's nodes
    rank = [sum(1 for j in range(i) if par[j] == par[i]) for i in range(N)]
    stats = [0] * (2 * D + 2 * R)
    for d in range(1, D + 1):
        stats[d - 1] = int(any(dep[i] == d for i in offered))
        stats[D + d - 1] = int(d < n)
    for i in offered:
        stats[2 * D + rank[i]] += 1
    for i in line[1:]:
        stats[2 * D + R + rank[i]] += 1
    path = torch.tensor(path, dtype=torch.long)
    return {
        "preds": preds, "verified": torch.tensor(verified), "accepted": torch.tensor(accepted), "path": path,
        "n_acc": torch.tensor([n]), "emitted": preds[path], "stats": torch.tensor(stats, dtype=torch.long),
    }  # fmt: skip


# ----------------------------------------------------------------------------- the op


@torch.library.custom_op(
    "longspec::greedy_accept", mutates_args=("preds", "verified", "accepted", "path", "n_acc", "emitted", "stats")
)
def _greedy_accept_op(
    logits: torch.Tensor, tokens: torch.Tensor, parents: torch.Tensor, depths: torch.Tensor, anc: torch.Tensor,
    preds: torch.Tensor, verified: torch.Tensor, accepted: torch.Tensor, path: torch.Tensor, n_acc: torch.Tensor,
    emitted: torch.Tensor, stats: torch.Tensor, D: int, R: int,
) -> None:  # fmt: skip
    """`torch.ops.longspec.greedy_accept`: writes preds, verified, accepted, path, n_acc, emitted and adds to stats
    (the decoder's buffers; shapes checked by `greedy_accept`)."""
    N, V = logits.shape
    pow2 = triton.next_power_of_2
    _greedy_accept_kernel[(N,)](
        logits, tokens, parents, depths, anc.view(torch.uint8), preds, verified.view(torch.uint8),
        accepted.view(torch.uint8), path, n_acc, emitted, stats, tickets(logits.device), N, V, logits.stride(0),
        D=D, R=R, BLOCK_V=min(BLOCK_V, pow2(V)), N_PAD=pow2(N), D_PAD=pow2(D + 1), K_PAD=pow2(2 * D + 2 * R),
        WALK=_tail_form() == "walk", num_warps=_num_warps(), **launch_args(logits.device),
    )  # fmt: skip


@_greedy_accept_op.register_fake
def _(logits, tokens, parents, depths, anc, preds, verified, accepted, path, n_acc, emitted, stats, D, R):
    return None


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def fits(N: int, D: int) -> bool:
    """Whether the kernel takes a tree of N nodes and depth D (the decoder's switch falls back otherwise)."""
    return 1 <= N <= MAX_NODES and 0 <= D < N


def greedy_accept(logits, tokens, parents, depths, anc, out: dict, D: int, R: int) -> None:
    """Greedy acceptance of one verification pass in one launch, into the buffers of `out` (keys `preds` [N],
    `verified`, `accepted` [N] bool, `path` [D + 1], `n_acc` [1], `emitted` [D + 1] and `stats` [2D + 2R], int64
    unless said, on the logits' device; `stats` is added to). logits [N, V] fp16/bf16/fp32 on CUDA (or on the CPU
    under TRITON_INTERPRET=1); tokens, parents, depths [N] int64; anc [N, N] bool, the tree mask."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.dtype not in _DTYPES:
        got = f"{tuple(logits.shape)} {logits.dtype}" if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"greedy_accept needs logits [N, V] in float16, bfloat16 or float32, got {got}")
    N, V = logits.shape
    if not fits(N, D):
        raise ValueError(
            f"greedy_accept takes 1 to {MAX_NODES} nodes with depth below the node count, got N = {N}, D = {D}; "
            "larger trees use spec.verify.greedy_accept (ops.accept falls back to it by itself)"
        )
    if isinstance(R, bool) or not isinstance(R, int) or R < 1:
        raise ValueError(f"greedy_accept needs the widest level R >= 1, got {R!r}")
    dev = logits.device
    want = {"tokens": (tokens, (N,), torch.long), "parents": (parents, (N,), torch.long),
            "depths": (depths, (N,), torch.long), "anc": (anc, (N, N), torch.bool)}  # fmt: skip
    sizes = {"preds": (N,), "verified": (N,), "accepted": (N,), "path": (D + 1,), "n_acc": (1,),
             "emitted": (D + 1,), "stats": (2 * D + 2 * R,)}  # fmt: skip
    missing = sorted(set(sizes) - set(out))
    if missing:
        raise ValueError(f"greedy_accept's out needs the buffers {', '.join(missing)}")
    for name, shape in sizes.items():
        want[name] = (out[name], shape, torch.bool if name in ("verified", "accepted") else torch.long)
    for name, (t, shape, dtype) in want.items():
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != dtype or t.device != dev:
            got = f"{tuple(t.shape)} {t.dtype} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"greedy_accept needs {name} {list(shape)} {dtype} on {dev}, got {got}")
        if not t.is_contiguous():
            raise ValueError(f"greedy_accept needs a contiguous {name}; pass {name}.contiguous()")
    if not (logits.is_cuda or _INTERPRET):
        raise ValueError(
            f"greedy_accept runs a Triton kernel and got a tensor on {dev}; pass CUDA tensors, or set "
            "TRITON_INTERPRET=1 before importing longspec_lab.kernels.greedy_accept (on the CPU, "
            "spec.verify.greedy_accept computes the same)"
        )
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    _greedy_accept_op(
        logits, tokens, parents, depths, anc, out["preds"], out["verified"], out["accepted"], out["path"],
        out["n_acc"], out["emitted"], out["stats"], D, R,
    )  # fmt: skip


# ----------------------------------------------------------------------------- benchmark


def random_tree(widths, V: int, seed: int, device, dtype=torch.bfloat16, p_match: float = 0.8) -> tuple:
    """A tree of the given level widths with random parents (each in the level above) and tokens that match the
    argmax of random logits at their parent with probability p_match: (logits [N, V], tokens, parents, depths [N],
    anc [N, N] bool), on `device`, seeded. For the benchmark; the tests build theirs with spec.draft.TreeBuffers."""
    g = torch.Generator().manual_seed(seed)
    sizes = [1, *widths]
    N = sum(sizes)
    logits = (torch.randn(N, V, generator=g) * 3).to(dtype)
    preds = logits.float().argmax(-1)
    parents, depths, lo = [-1], [0], 0
    for d, w in enumerate(widths, start=1):
        parents += (lo + torch.randint(0, sizes[d - 1], (w,), generator=g)).tolist()
        depths += [d] * w
        lo += sizes[d - 1]
    parents = torch.tensor(parents)
    tokens = torch.where(
        torch.rand(N, generator=g) < p_match, preds[parents.clamp_min(0)], torch.randint(0, V, (N,), generator=g)
    )
    anc = torch.eye(N, dtype=torch.bool)
    for i in range(1, N):  # parents come before their children: a node's row is its parent's plus itself
        anc[i] |= anc[int(parents[i])]
    put = lambda t: t.to(device)  # noqa: E731
    return put(logits), put(tokens), put(parents), put(torch.tensor(depths)), put(anc)


def main(argv=None) -> int:
    """Time the one-launch greedy tail against torch's argmax alone (compiled), and against one launch (CUDA)."""
    import argparse

    global TAIL_FORM, NUM_WARPS  # --forms and --warps set them for each timed run, and put them back

    ap = argparse.ArgumentParser(
        prog="python -m longspec_lab.kernels.greedy_accept",
        description=(
            "Time a verification pass's greedy tail in one launch (every node's argmax, then the last program's "
            "acceptance walk, path, emitted tokens and acceptance counts) on random trees of the given shapes over "
            "random bf16 logits, against the argmax alone compiled by torch.compile (the first of the definition's "
            "six launches: a floor for any form that starts from the logits) and against one launch (the smallest "
            "kernel's boundary, kernels/launch.py). Each run is first checked against the node-by-node reference. "
            "Prints medians (us) replayed from CUDA graphs. The decoder's A/B is `python -m "
            "longspec_lab.bench.gpu_jobs --only e2e_base,e2e_greedy_accept_off`."
        ),
    )
    ap.add_argument(
        "--shapes",
        default="4,16,16,16,16;1,2,3,4,2,1,3;1,1,1,1,1",
        help="semicolon-separated tree shapes, level widths comma-separated (default %(default)s)",
    )
    ap.add_argument("--vocab", type=int, default=4096, help="tokens V (default: the embedded model's 4096)")
    ap.add_argument(
        "--forms", default=TAIL_FORM,
        help="comma-separated forms of the last program's acceptance to time: tile (the [N, N] mask tile) and/or "
        "walk (depth by depth) (default %(default)s)",
    )  # fmt: skip
    ap.add_argument("--warps", default=str(NUM_WARPS), help="comma-separated warps a program: 1, 2, 4, 8, 16")
    ap.add_argument("--out", help="also write the medians, with the environment, to this JSON file (must not exist)")
    a = ap.parse_args(argv)
    forms = [f.strip() for f in a.forms.split(",") if f.strip()]
    if not forms or any(f not in _FORMS for f in forms):
        ap.error(f"--forms takes {' and/or '.join(_FORMS)}, comma-separated; got {a.forms!r}")
    try:
        warps = [int(w) for w in a.warps.split(",")]
    except ValueError:
        warps = []
    if not warps or any(w not in (1, 2, 4, 8, 16) for w in warps):
        ap.error(f"--warps takes 1, 2, 4, 8 or 16, comma-separated; got {a.warps!r}")
    try:
        shapes = [[int(w) for w in s.split(",")] for s in a.shapes.split(";")]
    except ValueError:
        ap.error("--shapes takes level widths like 4,16,16;1,2,3 (integers, commas within a shape)")
    if any(not s or min(s) < 1 or not fits(1 + sum(s), len(s)) for s in shapes) or a.vocab < 1:
        ap.error(f"--shapes needs widths >= 1 and at most {MAX_NODES} nodes a tree; --vocab >= 1")
    if a.out and os.path.exists(a.out):
        ap.exit(2, f"error: {a.out} exists; pick another --out or remove it first\n")
    if not torch.cuda.is_available():
        ap.exit(2, "error: the benchmark needs a CUDA GPU; on the CPU the tests run the kernel in Triton's "
                   "interpreter (.venv/bin/pytest tests/unit/kernels/test_greedy_accept.py)\n")  # fmt: skip
    from triton.testing import do_bench_cudagraph

    from longspec_lab.kernels.launch import boundary_cost_us

    launch_us = boundary_cost_us()["unit_us"]
    argmax = torch.compile(lambda z: z.argmax(-1), fullgraph=True, dynamic=False)
    report = {"vocab": a.vocab, "dtype": "bfloat16", "launch_floor_us": launch_us, "cases": []}
    for seed, widths in enumerate(shapes):
        logits, tokens, parents, depths, anc = random_tree(widths, a.vocab, seed, "cuda")
        N, D, R = tokens.numel(), len(widths), max(widths)
        L = lambda n: torch.zeros(n, dtype=torch.long, device="cuda")  # noqa: E731
        B = lambda n: torch.zeros(n, dtype=torch.bool, device="cuda")  # noqa: E731
        out = {"preds": L(N), "verified": B(N), "accepted": B(N), "path": L(D + 1), "n_acc": L(1),
               "emitted": L(D + 1), "stats": L(2 * D + 2 * R)}  # fmt: skip
        run = lambda: greedy_accept(logits, tokens, parents, depths, anc, out, D, R)  # noqa: E731
        ref = greedy_accept_reference(logits, tokens, parents, depths, anc, D, R)
        us, wrong = {}, []
        default = (TAIL_FORM, NUM_WARPS)
        for form in forms:
            for w in warps:
                TAIL_FORM, NUM_WARPS = form, w
                run()
                bad = [k for k in ref if k != "stats" and not torch.equal(out[k].cpu(), ref[k])]
                if bad:
                    wrong.append(f"{form}/{w} warps: {', '.join(bad)}")
                    continue
                name = "kernel" if (form, w) == default else f"kernel_{form}_w{w}"
                us[name] = do_bench_cudagraph(run, return_mode="median") * 1e3
        TAIL_FORM, NUM_WARPS = default
        for line in wrong:
            print(f"{widths}: {line} differ from the reference -- not timed")
        us["argmax_compiled"] = do_bench_cudagraph(lambda: argmax(logits), return_mode="median") * 1e3
        case = {"shape": widths, "nodes": N, "us": us, "vs_launch_floor": {k: v / launch_us for k, v in us.items()}}
        report["cases"].append(case)
        timed = ", ".join(f"{k} {v:.1f}" for k, v in us.items())
        print(f"{widths} ({N} nodes, V={a.vocab}; us): {timed}; one launch {launch_us:.2f} us")
    if a.out:
        from longspec_lab.provenance import stamp, write_new_json

        write_new_json(a.out, stamp(report, torch.device("cuda"), torch.bfloat16))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
