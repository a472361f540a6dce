"""The GPU measurement jobs, in the order the project runs them on a rented H200.

    python -m longspec_lab.bench.gpu_jobs --out OUT_DIR [--only e2e,agreement,notebooks]

Each job is a subprocess with its own time limit and log file, so one failure does not lose the
others' results. Everything lands in OUT_DIR as JSON + log; copy them to data/results/.
  kernel     python -m longspec_lab.kernels.bench_tree_attention (tree attention against SDPA, Flex, floors)
  verify     python -m longspec_lab.bench.verify_cost           (8B-shaped verify against decode cost)
  verify_compiled  the same with decode, verify and the draft step compiled at 4k and 32k (348 s on an H100)
  verify_compiled_128k  the same at 128k alone, Triton backend only and no transformers (its verify compiles for
             about 4 minutes; with the draft step compiled too and both backends and transformers it ran past 450 s
             on an H100, so it gets a call to itself and times only what the record lacks), with LONGSPEC_AUTOTUNE=0
  verify_4k, verify_4k_lm_head_torch  the LM head's rule inside the 8B steps, an A/B in one call: verify_cost at
             4k compiled, with the rule (an 8B head of at most 16 rows through norm_linear) and with
             LONGSPEC_LM_HEAD=torch (cuBLAS; the Triton backend alone, no transformers: the A side has them)
  verify_32k the 32k context of verify_compiled alone (about 175 s), so that it fits a call beside the 4k A/B
  topk_8b    python -m longspec_lab.kernels.row_topk --flat on the 8B draft's level (16 x 128,256 keys), per
             first-pass width and selection
  profile_8b python -m longspec_lab.bench.profile_8b --compile --draft (every kernel of the 8B steps and of the
             draft step at 4k, the projections alone, the compiled decode, verify and draft)
  launch     python -m longspec_lab.kernels.launch              (a kernel boundary's cost with PDL and without,
             and a persistent kernel's waits against it: does fusing the step into one launch pay?)
  e2e        python -m longspec_lab.bench.h200_speed (compiled e2e vs transformers, kernels per stage)
  bi         python -m longspec_lab.bench.h200_speed --only bi (batch-invariant mode against the default)
  agreement  python -m longspec_lab.bench.verify_cost --agreement (our logits against transformers, 8B)
  notebooks  python -m longspec_lab.teach.run_notebooks 07 04 (live, with --wheels .whl when that folder exists)
  tune       longspec-lab tune                                  (tree-shape search, validated)
  acceptance python -m longspec_lab.bench.acceptance_check      (the tuner's acceptance models against measured
             tau, bf16 on the GPU, where continuations can part at near ties)
  norm_linear      python -m longspec_lab.kernels.norm_linear --sweep (fused RMSNorm + projection against PyTorch,
                   and every tile per case: the 72-row verify takes 4.0 us a call with today's pick)
  norm_linear_lm_head  the same sweep on the LM head alone (1, 16 and 72 rows: the verify's 72 took 7.6 us, 2.6
                   times the AR step's one row), to set its tiles
  e2e_norm_linear  the A/B for that kernel: the e2e job's h200_speed with LONGSPEC_NORM_LINEAR=off (AR, chain
                   gamma 5, the default tree; e2e and profile, no transformers peers) into OUT_DIR/norm_linear_off,
                   to compare with the e2e job's e2e_h200.json (default "auto": the kernel on this model)
  e2e_masked_math  the same three methods with LONGSPEC_MASKED_ATTN=math (the draft's window attention written
                   out instead of SDPA's cuDNN kernel) into OUT_DIR/masked_math, to compare with e2e_h200.json
  e2e_masked_sdpa  the same with LONGSPEC_MASKED_ATTN=sdpa (one SDPA call, cuDNN's kernel, for every level; the
                   default "auto" writes a tree level's attention out) into OUT_DIR/masked_sdpa
  e2e_masked_efficient  the same with LONGSPEC_MASKED_ATTN=efficient (SDPA held to its memory-efficient kernel)
                   into OUT_DIR/masked_efficient
  e2e_masked_triton  the same with LONGSPEC_MASKED_ATTN=triton (one kernel launch, kernels/masked_attention.py,
                   for every level's window attention) into OUT_DIR/masked_triton
  e2e_fuse_residual  the same with LONGSPEC_FUSE_RESIDUAL=auto (each target layer's o_proj + residual and its
                   norm + gate/up in one launch) into OUT_DIR/fuse_residual
  e2e_step_graph_off  the same with LONGSPEC_STEP_GRAPH=off (one CUDA graph per stage instead of one per greedy
                   step) into OUT_DIR/step_graph_off
  e2e_topk_rank    the same with LONGSPEC_TOPK_SECOND=rank (the beam's second top-k pass ranks by counting
                   instead of repeated maxima) into OUT_DIR/topk_rank
  e2e_rope_tables_off  the same with LONGSPEC_ROPE_TABLES=off (each compiled target pass computes its RoPE tables
                   in generated code, a copy per layer, instead of one launch of kernels/rope.py) into
                   OUT_DIR/rope_tables_off
  e2e_qkv_rope_off  the same with LONGSPEC_QKV_ROPE=off (the target's layers and the draft's self-attention take
                   the readable q/k/v, RoPE and cache writes) into OUT_DIR/qkv_rope_off
  e2e_topk_second_256  the same with LONGSPEC_TOPK_SECOND_BLOCK=256 (the beam's second top-k pass over chunks of
                   256 candidates, one warp each, then one more pass) into OUT_DIR/topk_second_256
  e2e_tree_split_off  the same with LONGSPEC_TREE_SPLIT=off (a verification pass's tree keys attended by the last
                   prefix split, after its share of the prefix, instead of by programs of their own) into
                   OUT_DIR/tree_split_off
  e2e_pdl_off      the same with LONGSPEC_PDL=off (every kernel launched plainly, Inductor's and ours, instead of
                   with programmatic dependent launch) into OUT_DIR/pdl_off
  e2e_weight_first_off  the same with LONGSPEC_WEIGHT_FIRST=off (norm_linear reads its weight after the PDL wait,
                   in K steps; "on", its weight first, is the default since the A/B of 2026-12-05) into
                   OUT_DIR/weight_first_off; tokens must be bit-identical to e2e_base's
  e2e_weight_first_wide  the same with LONGSPEC_WEIGHT_FIRST=wide (down_proj too: its 768 inputs as one padded
                   step, weight first) into OUT_DIR/weight_first_wide
  e2e_beam_warps_4  the same with LONGSPEC_BEAM_WARPS=4 (the beam selection's programs with 4 warps, the default
                   before the A/B of 2026-12-05, which ran this side as e2e_beam_warps_8) into OUT_DIR/beam_warps_4
  e2e_fused_merge  the same with LONGSPEC_FUSED_MERGE=1 (tree attention's last split program merges the partials:
                   no merge launch; slower before PDL) into OUT_DIR/fused_merge
  topk_algo        python -m longspec_lab.kernels.row_topk --flat (a tree level's selection, 16 x 4096 keys, k = 16,
                   with each first-pass width, repeated maxima against Triton's bitonic network)
  e2e_topk_max     the A/B side with LONGSPEC_TOPK_ALGO=max and LONGSPEC_TOPK_FIRST_BLOCK=512 (the beam's top-k
                   passes by repeated maxima over chunks of 512 tokens; the bitonic network over 1,024 is the
                   default since the A/B of 2026-12-05) into OUT_DIR/topk_max; tokens must equal e2e_base's
  beam_select      python -m longspec_lab.kernels.beam_select (a beam level's selection in one launch against
                   the compiled definition, on the default tree's level shapes, each selection and warp count)
  e2e_beam_select  the A/B side with LONGSPEC_BEAM_SELECT=auto (every beam level's log-softmax and top-k in one
                   launch) into OUT_DIR/beam_select; the tokens should equal e2e_base's (a level's scores may differ
                   in their last bits, which reorders only near-tied pairs of the draft's tree)
  head_select      python -m longspec_lab.kernels.head_select (a beam level's LM head and selection in one launch
                   against the two launches it replaces and the compiled definition; chunk widths and warps)
  e2e_head_select  the A/B side with LONGSPEC_HEAD_SELECT=auto (every greedy beam level's LM head and selection
                   in one launch) into OUT_DIR/head_select; the tokens should equal e2e_base's (scores may differ in
                   their last bits, as with e2e_beam_select)
  e2e_greedy_accept_off  the A/B side with LONGSPEC_GREEDY_ACCEPT=off (every verification pass's argmax, greedy
                   acceptance, path, emitted tokens and counts as the compiled definition's six launches instead of
                   one, the default before 2026-12-06) into OUT_DIR/greedy_accept_off; tokens must be
                   bit-identical to e2e_base's
  e2e_beam_write_off  the A/B side with LONGSPEC_BEAM_WRITE=off (each beam level written by add_level's two
                   kernels after its selection launch, the default before 2026-12-06) into OUT_DIR/beam_write_off;
                   tokens must be bit-identical to e2e_base's
  e2e_greedy_tail_tile  the A/B side with LONGSPEC_GREEDY_TAIL=tile (the greedy tail's last program finds the
                   accepted nodes from the [N, N] mask tile, not depth by depth: the default before 2026-12-06) into
                   OUT_DIR/greedy_tail_tile; tokens must be bit-identical to e2e_base's
  e2e_masked_tile_rows_64  the A/B side with LONGSPEC_MASKED_TILE_ROWS=64 (the draft's window attention in row
                   tiles of up to 64 stacked rows, the default before 2026-12-06, instead of 16) into
                   OUT_DIR/masked_tile_rows_64; tokens must be bit-identical to e2e_base's
  e2e_row_tile_splits_32  the A/B side with LONGSPEC_ROW_TILE_SPLITS=32 (a verification pass with several row
                   tiles split into up to 32 prefix chunks of 128 keys instead of 16: the default tree's verify at
                   a 2.7k prefix 22 splits instead of 11) into OUT_DIR/row_tile_splits_32
  e2e_row_tile_config_32  the same with LONGSPEC_ROW_TILE_CONFIG=32:4:2 (those passes' split kernel on 32-key
                   tiles, 4 warps, 2 stages) into OUT_DIR/row_tile_config_32
  greedy_accept    python -m longspec_lab.kernels.greedy_accept (that launch alone against the argmax alone,
                   compiled, on the default tree, a narrow tree and a chain)
  e2e_combo_kernels  the A/B side with LONGSPEC_COMBO_KERNELS=on (the stages compiled with Inductor's combo
                   kernels: independent generated kernels launched as one) into OUT_DIR/combo_kernels; tokens must
                   be bit-identical to e2e_base's
  e2e_wide_base    the A side of the two below: AR, chain gamma 7 and 9 and four trees of 24-53 nodes
                   (WIDE_TREE_SHAPES), the default switches, into OUT_DIR/wide_base (about 3 minutes)
  e2e_wide_tree_split  the same with LONGSPEC_TREE_SPLIT=wide (a verification pass in one row tile of more than 64
                   packed rows, a tree of 33-64 nodes, also gives its tree keys programs of their own) into
                   OUT_DIR/wide_tree_split; the partials merge in another order, so a bf16 near-tie may flip a
                   token (compare tau, and outputs_sha256 where they agree)
  e2e_wide_block_m_64  the same with LONGSPEC_BLOCK_M=64 (every tree-attention pass in row tiles of 64, so those
                   verifications take two tiles and the tree's own programs under auto) into OUT_DIR/wide_block_m_64
  sweep_block_m    python -m longspec_lab.kernels.sweep_tree_attention on the embedded decode, verify and draft
                   cross-attention shapes with row tiles of 16, 32 and 64 (the decoder's rule knows 64 and 128 only:
                   a decode's 2 packed rows and a verify's 144 are padded to tiles of 64), each plan checked against
                   float64, about 150 s
  e2e_block_m_16, e2e_block_m_32  the A/B sides with LONGSPEC_BLOCK_M=16 or 32 (every tree-attention pass in row
                   tiles of that size: AR, the chain and the default tree; the draft's cross-attention too) into
                   OUT_DIR/block_m_16 and OUT_DIR/block_m_32; run e2e_base in the same call
  beam_select_chunk_keys  python -m longspec_lab.kernels.beam_select with the three forms of its chunk programs
                   (LONGSPEC_BEAM_CHUNK_KEYS: scores, logits, logits_rows) on a chain's, the default tree's and a
                   narrow tree's level shapes, at chunks of 512 and 1,024 tokens, each checked against float64
  beam_select_phases  the same kernel stopped after each phase (--phases), the form before and the default, on the
                   default tree's three level shapes: where each spends its time, by difference
  e2e_beam_chunk_base  the A side of the two below: AR, chain gamma 5 and two trees (BEAM_CHUNK_SHAPES) with the
                   form before, LONGSPEC_BEAM_CHUNK_KEYS=scores (logits_rows is the default since 2026-12-06)
  e2e_beam_chunk_logits  the same with LONGSPEC_BEAM_CHUNK_KEYS=logits (each chunk program ranks its own logits
                   and keeps its chunk's maximum and sum) into OUT_DIR/beam_chunk_logits; the pairs are the same,
                   scores may differ in their last bits (compare tau and tokens)
  e2e_beam_chunk_logits_rows  the same with logits_rows (the last program keeps each row's best first)
  beam_select_last  python -m longspec_lab.kernels.beam_select, the default form (logits_rows) at 4 and 8 warps
                   on a chain's, the default tree's and a narrow tree's level shapes: run it here and with
                   --code DIR (an older commit's package, below) to time a change to the kernel against that commit
  e2e_beam_base    the A side of the one below: AR, chain gamma 5 and two trees (BEAM_CHUNK_SHAPES), the default
                   switches, into OUT_DIR/beam_base
  e2e_beam_warps_auto  the same with LONGSPEC_BEAM_WARPS=auto (4 warps for levels of up to 4 parents, 8 past
                   them) into OUT_DIR/beam_warps_auto; the same tokens
  e2e_base         the A side for the B sides above in the same call: the same three methods with the default
                   switches into OUT_DIR/base
  e2e_qkv_rope     the same with LONGSPEC_QKV_ROPE=on (norm, q/k/v, RoPE and the cache write in one kernel per
                   target layer) into OUT_DIR/qkv_rope
Device time is the scarce thing: e2e takes about 8 minutes (mostly compilation), the others 2-4 each.

An A/B against an older commit (a change with no switch): `--code DIR` runs the jobs with the package of DIR, an
archive of that commit made here and carried to the device with the tree:

    mkdir -p build/base && git archive COMMIT longspec_lab kernels pyproject.toml | tar -x -C build/base
    git rev-parse COMMIT > build/base/COMMIT
    python -m longspec_lab.bench.gpu_jobs --out OUT/new --only e2e_base,beam_select_last           # this tree
    python -m longspec_lab.bench.gpu_jobs --out OUT/old --only e2e_base,beam_select_last --code build/base

Each job then runs in DIR with DIR first on PYTHONPATH. DIR's `longspec_lab/kernels` and `data` are linked to its
`kernels/` and to this tree's data where missing, and every JSON the job writes gets a `code_commit_note` naming DIR
and its COMMIT, since the archive has no git of its own. The job table and its flags are this tree's: a flag the
older commit lacks fails that job alone, in its log.

Taught in: notebooks/07_timing_real_gpu_runs.ipynb
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# trees of 33-64 nodes (66-128 packed rows: one row tile of 128 in a verification pass), with a narrow tree of 24
# beside them and the chains of their depths: the shapes of the LONGSPEC_TREE_SPLIT=wide A/B
WIDE_TREE_SHAPES = "1,2,4,4,4,4,4;3,6,6,6,8,4,4;4,8,8,8,8,8,8;2,4,4,4,4,4,4,4,4"
# the beam selection's chunk forms (LONGSPEC_BEAM_CHUNK_KEYS): the default tree (levels of 4 and 16 parents, width
# 16) and the fastest narrow tree (levels of 4 x 4), with chain gamma 5 (a level of one key)
BEAM_CHUNK_SHAPES = "4,16,16,16,16;1,2,4,4,4,4,4"


def _ab_job(folder: Path, switch: str | None = None, value: str = "", shapes="4,16,16,16,16", gammas="5", **more):
    """One side of an A/B: AR, chain gamma 5 and the default tree (or `shapes` and `gammas`), e2e and kernels per
    stage, no transformers peers, with one switch set (none for the A side, `e2e_base`; `more`: further LONGSPEC_*
    switches of the same side); 118 s on the H200 with a warm compile cache, about 150 s cold. Run the A side in the
    same call as the B sides: runs on different days differ by 5-10%."""
    cmd = [sys.executable, "-m", "longspec_lab.bench.h200_speed", "--out", str(folder), "--only", "e2e,profile",
           "--gammas", gammas, "--shapes", shapes, "--no-hf"]  # fmt: skip
    env = {"LONGSPEC_AUTOTUNE": "0", "LONGSPEC_COMPILE_MODE": "default"}
    return cmd, 300, {**env, **({switch: value} if switch else {}), **more}


def _beam_levels_job(py: str, path: Path, *flags: str) -> tuple:
    """`kernels.beam_select` alone on a chain's, the default tree's and a narrow tree's level shapes (`flags`: the
    forms, chunks and warps to time), each run checked against float64, the medians into `path`."""
    cmd = [py, "-m", "longspec_lab.kernels.beam_select", "--rows", "1,1,4,16,4", "--width", "1,4,16,16,4", *flags,
           "--out", str(path)]  # fmt: skip
    return cmd, 150, {}


def _verify_compiled(py: str, path: Path, context: int, *more: str) -> list:
    """verify_cost at one context with decode, verify and the draft step compiled (`more`: further flags)."""
    c = str(context)
    return [py, "-m", "longspec_lab.bench.verify_cost", "--contexts", c, "--compile", c, "--out", str(path), *more]


def jobs(out: Path) -> dict:
    py = sys.executable
    return {
        "kernel": (
            [
                py,
                "-m",
                "longspec_lab.kernels.bench_tree_attention",
                "--out",
                str(out / "tree_attention_h200.json"),
                "--plot",
                str(out / "tree_attention_h200.svg"),
            ],
            420,
            {},
        ),
        "verify": ([py, "-m", "longspec_lab.bench.verify_cost", "--out", str(out / "verify_8b_h200.json")], 240, {}),
        "verify_compiled": (
            [
                py,
                "-m",
                "longspec_lab.bench.verify_cost",
                "--contexts",
                "4096,32768",
                "--compile",
                "4096,32768",
                "--out",
                str(out / "verify_8b_compiled_h200.json"),
            ],
            540,
            {},
        ),
        "verify_compiled_128k": (
            # the compiled draft was the missing figure (435 s on an H100 from a cold cache,
            # verify_8b_compiled_h100.json): the SDPA and transformers sides of 128k are on record
            # (verify_8b_h100.json), and left out they leave the call's time to the compiles
            _verify_compiled(py, out / "verify_8b_compiled_128k_h200.json", 131072, "--backends", "triton", "--no-hf"),
            590,
            # the tree kernel's one fixed config: the config its autotuner picks at 64k and 128k anyway (64-key tiles,
            # 4 warps, 3 stages, plain loads: tree_attention_h200.json), without the tuning runs inside the compile
            {"LONGSPEC_AUTOTUNE": "0"},
        ),
        # the LM head's rule inside the compiled 8B steps, the A/B: the same 4k context with the rule (an 8B head of at
        # most 16 rows through norm_linear) and with cuBLAS for every head (LONGSPEC_LM_HEAD=torch); about 150 s a side
        "verify_4k": (_verify_compiled(py, out / "verify_8b_4k_h200.json", 4096), 300, {}),
        # the 32k half of verify_compiled on its own, to fit a call beside the 4k A/B
        "verify_32k": (_verify_compiled(py, out / "verify_8b_32k_h200.json", 32768), 300, {}),
        "verify_4k_lm_head_torch": (
            _verify_compiled(py, out / "verify_8b_4k_lm_head_torch_h200.json", 4096, "--backends", "triton", "--no-hf"),
            300,
            {"LONGSPEC_LM_HEAD": "torch"},
        ),
        # the 8B draft's selection, 16 x 128,256 keys a level (45 us on an H100 with 1,024-key chunks, which leave
        # 2,016 chunks' candidates for the second pass): every first-pass width, both selections
        "topk_8b": (
            [
                py,
                "-m",
                "longspec_lab.kernels.row_topk",
                "--flat",
                "--rows",
                "16",
                "--vocab",
                "128256",
                "--k",
                "16",
                "--block-v",
                "1024,2048,4096",
                "--algo",
                "max,bitonic",
                "--out",
                str(out / "row_topk_8b_h200.json"),
            ],
            180,
            {},
        ),  # fmt: skip
        "profile_8b": (
            [
                py,
                "-m",
                "longspec_lab.bench.profile_8b",
                "--contexts",
                "4096",
                "--compile",
                "--draft",
                "--out",
                str(out / "profile_8b_h200.json"),
            ],
            360,
            {},
        ),
        "launch": ([py, "-m", "longspec_lab.kernels.launch", "--out", str(out / "launch_h200.json")], 120, {}),
        "e2e": (
            [
                py,
                "-m",
                "longspec_lab.bench.h200_speed",
                "--out",
                str(out),
                "--only",
                "e2e,profile",
                "--gammas",
                "5,7,8",  # and h200_speed's default shapes: the default tree, the best measured, the tuner's pick
            ],
            590,  # 522 s on the H200 for three chains and three trees with the transformers peers (2026-12-04)
            {"LONGSPEC_AUTOTUNE": "0", "LONGSPEC_COMPILE_MODE": "default"},
        ),
        "bi": (  # batch-invariant mode against the default, its own call: 62 s on the H200 (2026-12-04)
            [py, "-m", "longspec_lab.bench.h200_speed", "--out", str(out), "--only", "bi"],
            240,
            {"LONGSPEC_AUTOTUNE": "0", "LONGSPEC_COMPILE_MODE": "default"},
        ),
        "norm_linear": (
            [py, "-m", "longspec_lab.kernels.norm_linear", "--sweep", "--out", str(out / "norm_linear_tiles.json")],
            330,  # the plain comparison took ~20 s on the H200; the tile sweep stops starting tiles at 240 s
            {},
        ),
        "norm_linear_lm_head": (  # the LM head's tiles at 1, 16 and 72 rows: the verify's took 7.6 us
            [
                py,
                "-m",
                "longspec_lab.kernels.norm_linear",
                "--sweep",
                "--cases",
                "lm_head",
                "--budget-s",
                "150",
                "--out",
                str(out / "norm_linear_lm_head_tiles.json"),
            ],  # fmt: skip
            240,
            {},
        ),
        "e2e_base": _ab_job(out / "base"),
        "e2e_norm_linear": _ab_job(out / "norm_linear_off", "LONGSPEC_NORM_LINEAR", "off"),
        "e2e_masked_math": _ab_job(out / "masked_math", "LONGSPEC_MASKED_ATTN", "math"),
        "e2e_masked_sdpa": _ab_job(out / "masked_sdpa", "LONGSPEC_MASKED_ATTN", "sdpa"),
        "e2e_masked_efficient": _ab_job(out / "masked_efficient", "LONGSPEC_MASKED_ATTN", "efficient"),
        "e2e_masked_triton": _ab_job(out / "masked_triton", "LONGSPEC_MASKED_ATTN", "triton"),
        "e2e_fuse_residual": _ab_job(out / "fuse_residual", "LONGSPEC_FUSE_RESIDUAL", "auto"),
        "e2e_step_graph_off": _ab_job(out / "step_graph_off", "LONGSPEC_STEP_GRAPH", "off"),
        "e2e_topk_rank": _ab_job(out / "topk_rank", "LONGSPEC_TOPK_SECOND", "rank"),
        "e2e_qkv_rope": _ab_job(out / "qkv_rope", "LONGSPEC_QKV_ROPE", "on"),
        "e2e_rope_tables_off": _ab_job(out / "rope_tables_off", "LONGSPEC_ROPE_TABLES", "off"),
        "e2e_qkv_rope_off": _ab_job(out / "qkv_rope_off", "LONGSPEC_QKV_ROPE", "off"),
        "e2e_topk_second_256": _ab_job(out / "topk_second_256", "LONGSPEC_TOPK_SECOND_BLOCK", "256"),
        "e2e_tree_split_off": _ab_job(out / "tree_split_off", "LONGSPEC_TREE_SPLIT", "off"),
        "e2e_pdl_off": _ab_job(out / "pdl_off", "LONGSPEC_PDL", "off"),
        "e2e_weight_first_off": _ab_job(out / "weight_first_off", "LONGSPEC_WEIGHT_FIRST", "off"),
        "e2e_weight_first_wide": _ab_job(out / "weight_first_wide", "LONGSPEC_WEIGHT_FIRST", "wide"),
        "e2e_fused_merge": _ab_job(out / "fused_merge", "LONGSPEC_FUSED_MERGE", "1"),
        "e2e_beam_warps_4": _ab_job(out / "beam_warps_4", "LONGSPEC_BEAM_WARPS", "4"),
        "e2e_topk_max": _ab_job(out / "topk_max", "LONGSPEC_TOPK_ALGO", "max", LONGSPEC_TOPK_FIRST_BLOCK="512"),
        "e2e_beam_select": _ab_job(out / "beam_select", "LONGSPEC_BEAM_SELECT", "auto"),
        "e2e_beam_chunk_base": _ab_job(
            out / "beam_chunk_base", "LONGSPEC_BEAM_CHUNK_KEYS", "scores", shapes=BEAM_CHUNK_SHAPES
        ),
        "e2e_beam_chunk_logits": _ab_job(
            out / "beam_chunk_logits", "LONGSPEC_BEAM_CHUNK_KEYS", "logits", shapes=BEAM_CHUNK_SHAPES
        ),
        "e2e_beam_chunk_logits_rows": _ab_job(
            out / "beam_chunk_logits_rows",
            "LONGSPEC_BEAM_CHUNK_KEYS",
            "logits_rows",
            shapes=BEAM_CHUNK_SHAPES,
        ),
        "e2e_beam_base": _ab_job(out / "beam_base", shapes=BEAM_CHUNK_SHAPES),
        "e2e_beam_warps_auto": _ab_job(
            out / "beam_warps_auto", "LONGSPEC_BEAM_WARPS", "auto", shapes=BEAM_CHUNK_SHAPES
        ),
        # the default form alone at 4 and 8 warps: this tree's last program against an older one's
        "beam_select_last": _beam_levels_job(
            py, out / "beam_select_last.json", "--chunk-keys", "logits_rows", "--warps", "4,8"
        ),
        # the three chunk forms alone on the levels of the default tree and a chain
        "beam_select_chunk_keys": _beam_levels_job(
            py,
            out / "beam_select_chunk_keys.json",
            "--block-v",
            "512,1024",
            "--algo",
            "bitonic",
            "--warps",
            "8",
            "--chunk-keys",
            "scores,logits,logits_rows",
        ),
        "beam_select_phases": (  # where each form's selection spends its time: stopped after each phase, by difference
            [
                py,
                "-m",
                "longspec_lab.kernels.beam_select",
                "--rows",
                "1,4,16",
                "--width",
                "4,16,16",
                "--phases",
                "--chunk-keys",
                "scores,logits_rows",
                "--out",
                str(out / "beam_select_phases.json"),
            ],
            150,
            {},
        ),  # fmt: skip
        "e2e_combo_kernels": _ab_job(out / "combo_kernels", "LONGSPEC_COMBO_KERNELS", "on"),
        "e2e_head_select": _ab_job(out / "head_select", "LONGSPEC_HEAD_SELECT", "auto"),
        "e2e_greedy_accept_off": _ab_job(out / "greedy_accept_off", "LONGSPEC_GREEDY_ACCEPT", "off"),
        "e2e_beam_write_off": _ab_job(out / "beam_write_off", "LONGSPEC_BEAM_WRITE", "off"),
        "e2e_greedy_tail_tile": _ab_job(out / "greedy_tail_tile", "LONGSPEC_GREEDY_TAIL", "tile"),
        "e2e_masked_tile_rows_64": _ab_job(out / "masked_tile_rows_64", "LONGSPEC_MASKED_TILE_ROWS", "64"),
        "e2e_row_tile_splits_32": _ab_job(out / "row_tile_splits_32", "LONGSPEC_ROW_TILE_SPLITS", "32"),
        "e2e_row_tile_config_32": _ab_job(
            out / "row_tile_config_32", "LONGSPEC_ROW_TILE_SPLITS", "32", LONGSPEC_ROW_TILE_CONFIG="32:4:2"
        ),
        "e2e_wide_base": _ab_job(out / "wide_base", shapes=WIDE_TREE_SHAPES, gammas="7,9"),
        "e2e_wide_tree_split": _ab_job(
            out / "wide_tree_split", "LONGSPEC_TREE_SPLIT", "wide", shapes=WIDE_TREE_SHAPES, gammas="7,9"
        ),
        "e2e_wide_block_m_64": _ab_job(
            out / "wide_block_m_64", "LONGSPEC_BLOCK_M", "64", shapes=WIDE_TREE_SHAPES, gammas="7,9"
        ),
        "sweep_block_m": (
            [
                py,
                "-m",
                "longspec_lab.kernels.sweep_tree_attention",
                "--shapes",
                "embedded-decode,embedded-verify,embedded-draft-cross",
                "--block-m",
                "16,32,64",
                "--budget-s",
                "150",
                "--out",
                str(out / "tree_attention_sweep_block_m.json"),
            ],
            200,
            {"LONGSPEC_AUTOTUNE": "0"},
        ),
        "e2e_block_m_16": _ab_job(out / "block_m_16", "LONGSPEC_BLOCK_M", "16"),
        "e2e_block_m_32": _ab_job(out / "block_m_32", "LONGSPEC_BLOCK_M", "32"),
        "greedy_accept": (
            [
                py,
                "-m",
                "longspec_lab.kernels.greedy_accept",
                "--forms",
                "walk,tile",
                "--warps",
                "4,8",
                "--out",
                str(out / "greedy_accept_h200.json"),
            ],
            120,
            {},
        ),
        "head_select": (
            [
                py,
                "-m",
                "longspec_lab.kernels.head_select",
                "--block-v",
                "64,128,256",
                "--warps",
                "4,8",
                "--out",
                str(out / "head_select_h200.json"),
            ],
            180,  # 3 shapes x 6 kernel forms + two references, a CUDA graph each
            {},
        ),
        "beam_select": (
            [
                py,
                "-m",
                "longspec_lab.kernels.beam_select",
                "--algo",
                "max,bitonic",
                "--warps",
                "1,2,4",
                "--block-v",
                "256,512,1024,2048,4096",
                "--out",
                str(out / "beam_select_h200.json"),
            ],
            240,  # 3 shapes x 30 kernel forms + the definition, a CUDA graph each, 30 Triton compiles
            {},
        ),
        "topk_algo": (
            [
                py,
                "-m",
                "longspec_lab.kernels.row_topk",
                "--flat",
                "--block-v",
                "512,1024,4096",
                "--algo",
                "max,bitonic",
                "--out",
                str(out / "row_topk_bitonic_h200.json"),
            ],
            120,  # under a minute for the flat cases of row_topk_flat_h200.json; twice as many here
            {},
        ),
        "agreement": (
            [py, "-m", "longspec_lab.bench.verify_cost", "--agreement", "--out", str(out / "agreement_8b_h200.json")],
            420,  # 180 s was not enough once the minimal cases joined it (H200, 2026-12-02)
            {},
        ),
        "notebooks": (
            [
                py,
                "-m",
                "longspec_lab.teach.run_notebooks",
                "notebooks/07_timing_real_gpu_runs.ipynb",
                "notebooks/04_hybrid_tree_attention_and_the_triton_kernel.ipynb",
                "--small",
                "0",
                "--out",
                str(out / "notebooks_h200"),
            ]
            + (["--wheels", ".whl"] if Path(".whl").is_dir() else []),
            300,
            {"LONGSPEC_QUICK": "1", "LONGSPEC_AUTOTUNE": "0"},
        ),
        "acceptance": (
            [
                py,
                "-m",
                "longspec_lab.bench.acceptance_check",
                "--device",
                "cuda",
                "--dtype",
                "bfloat16",
                "--quiet",
                "--out",
                str(out / "tune_acceptance_h200.json"),
            ],
            420,  # 86 s of probing and 8 measured shapes on 2 CPU cores; the eager decoder on the GPU: a few minutes
            {"LONGSPEC_AUTOTUNE": "0"},
        ),
        "tune": (
            [py, "-m", "longspec_lab", "tune", "--device", "cuda", "--quiet", "--out", str(out / "tune_h200.json")],
            200,
            {"LONGSPEC_AUTOTUNE": "0"},
        ),
    }


def prepare_code(code: str | os.PathLike) -> tuple[Path, str]:
    """(the folder, its commit) for `--code`: DIR must hold an archive of the package (`longspec_lab/__init__.py`
    and `kernels/`); links `longspec_lab/kernels` and `data` where missing, as a checkout has them. Raises
    ValueError naming what is missing and how to make it."""
    from longspec_lab.paths import DATA_DIR

    root = Path(code).resolve()
    make = "make it with: git archive COMMIT longspec_lab kernels pyproject.toml | tar -x -C DIR"
    if not (root / "longspec_lab" / "__init__.py").is_file() or not (root / "kernels").is_dir():
        raise ValueError(f"--code {code}: no longspec_lab/__init__.py and kernels/ there; {make}")
    for link, target in ((root / "longspec_lab" / "kernels", root / "kernels"), (root / "data", DATA_DIR)):
        if not link.exists():
            try:
                if link.is_symlink():  # a dangling link from another machine's paths
                    link.unlink()
                link.symlink_to(target, target_is_directory=True)
            except OSError as e:
                raise ValueError(
                    f"--code {code}: cannot link {link} to {target} ({e.strerror}); make {root} writable "
                    f"or make the link yourself"
                ) from None
    commit_file = root / "COMMIT"
    commit = commit_file.read_text().strip() if commit_file.is_file() else "unknown (no COMMIT file)"
    return root, commit


def _note_code(out: Path, since: float, root: Path, commit: str) -> int:
    """Add `code_commit_note` to every JSON under `out` written since `since` (a job run with `--code`); returns how
    many. A file that is not a JSON object is left as it is."""
    note = f"run from {root}, an archive of commit {commit} (gpu_jobs --code); environment.git_commit is the checkout's"
    done = 0
    for path in sorted(out.rglob("*.json")):
        if path.stat().st_mtime < since:
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "code_commit_note" not in data:
            data["code_commit_note"] = note
            path.write_text(json.dumps(data, indent=1))
            done += 1
    return done


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m longspec_lab.bench.gpu_jobs",
        description=__doc__.split("\n\nTaught in")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--out", required=True, help="folder for the JSON files and logs")
    ap.add_argument(
        "--only", default="e2e,agreement,notebooks",
        help="comma-separated job names from " + ",".join(jobs(Path("."))) + " (default: %(default)s)",
    )  # fmt: skip
    ap.add_argument(
        "--code", metavar="DIR",
        help="run the jobs with the package archived in DIR (an older commit's; see above), for an A/B against it",
    )  # fmt: skip
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()  # absolute: a job run with --code starts in DIR
    table = jobs(out)
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in table]
    if unknown or not names:
        ap.error(f"--only names unknown jobs {unknown}; choose from {', '.join(table)}")
    code = None
    if args.code:
        try:
            code = prepare_code(args.code)
        except ValueError as e:
            ap.error(str(e))
    out.mkdir(parents=True, exist_ok=True)
    run_env, cwd = {**os.environ, "PYTHONUNBUFFERED": "1"}, None
    if code:  # `python -m` puts its working folder first on sys.path: start in DIR, so DIR's package is the one run
        cwd = code[0]
        run_env["PYTHONPATH"] = os.pathsep.join([str(cwd), *filter(None, [os.environ.get("PYTHONPATH")])])
        print(f"running with the package in {cwd} (commit {code[1]})", flush=True)
    for name in names:
        cmd, limit, env = table[name]
        t0 = time.time()
        with open(out / f"{name}.log", "w") as log:
            if code:
                print(f"# run from {cwd}, commit {code[1]}", file=log, flush=True)
            try:
                rc = subprocess.run(
                    cmd,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=limit,
                    env={**run_env, **env},
                    cwd=cwd,
                ).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        if code:
            _note_code(out, t0 - 1, *code)
        print(f"[{name}] rc={rc} in {time.time() - t0:.0f}s", flush=True)
        print("".join(open(out / f"{name}.log").readlines()[-12:]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
