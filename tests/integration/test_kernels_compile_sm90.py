"""The Triton kernels compile for Hopper (sm_90) ahead of time, on this GPU-less machine.

The interpreter tests (tests/unit/kernels) execute the kernels with numpy; they cannot see what only the
GPU compiler checks (the H200 once met a tree-kernel variant that failed to compile with int64 context
lengths, which every interpreter test had accepted). `longspec_lab.kernels.compile_check` compiles every
kernel variant the library launches down to a cubin; the second test shows that ahead-of-time compilation
rejects a kernel that the interpreter runs correctly."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def _env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled kernels, not interpreted
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # a fresh cache: every variant really compiles
    return env


def test_every_kernel_variant_compiles_for_sm90(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "longspec_lab.kernels.compile_check", "--arch", "90"],
        capture_output=True, text=True, env=_env(tmp_path), timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    from longspec_lab.kernels.compile_check import variants

    n = len(variants())  # every kernel the package launches: tree split and merge, row top-k, norm_linear, ...
    assert n >= 12 and f"{n} of {n} kernel variants compiled for sm_90" in r.stdout, r.stdout


KERNEL = """
import os
import sys

import torch
import triton
import triton.language as tl


@triton.jit
def small_dot(X, Y, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)
    x = tl.load(X + r[:, None] * BLOCK + r[None, :])
    tl.store(Y + r[:, None] * BLOCK + r[None, :], tl.dot(x, x))  # the GPU's dot needs tiles >= 16


if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter runs the 8 x 8 tile
    x = torch.randn(8, 8)
    y = torch.empty(8, 8)
    small_dot[(1,)](x, y, BLOCK=8)
    print("interpreter 8: ran, max err", float((y - x @ x).abs().max()))
else:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for block in (8, 16):
        src = ASTSource(fn=small_dot, signature={"X": "*fp16", "Y": "*fp16", "BLOCK": "constexpr"},
                        constexprs={(2,): block})
        try:
            triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
            print(f"sm_90 {block}: compiled")
        except Exception as e:
            print(f"sm_90 {block}: failed {type(e).__name__}")
"""


def test_the_check_catches_what_the_interpreter_cannot(tmp_path):
    """An 8 x 8 tl.dot runs under the interpreter (right answer) but does not compile for sm_90; the
    16 x 16 one compiles. Ahead-of-time compilation is what sees the difference."""
    script = tmp_path / "small_dot.py"
    script.write_text(KERNEL)
    interp = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300,
        env={**_env(tmp_path), "TRITON_INTERPRET": "1"},
    )  # fmt: skip
    assert interp.returncode == 0, interp.stderr
    assert "interpreter 8: ran" in interp.stdout and float(interp.stdout.split("max err")[1]) < 1e-4
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=_env(tmp_path), timeout=300)
    assert r.returncode == 0, r.stderr
    assert "sm_90 8: failed" in r.stdout and "sm_90 16: compiled" in r.stdout, r.stdout + r.stderr


SHARED = """
from longspec_lab.kernels import compile_check as cc
from longspec_lab.kernels import norm_linear as nl

for kp in (256, nl.PRE_BLOCK_KP):
    nl.PRE_BLOCK_KP = kp
    for r in cc.compile_all(progress=None, only="residual_norm_linear: 72"):
        print(kp, r["ok"], r["shared_bytes"], r.get("error", ""))
"""


def test_the_check_catches_a_launch_over_the_shared_memory_limit(tmp_path):
    """The fused residual kernel's first prologue tile (256 features a step) compiled, and its launch on the H200
    failed: 278,528 bytes of shared memory asked, 232,448 allowed. The check now compiles pointers and feature
    counts as aligned (as a launch specialises them), so it reproduces that figure and rejects the variant; the
    tile in use passes."""
    r = subprocess.run([sys.executable, "-c", SHARED], capture_output=True, text=True, env=_env(tmp_path), timeout=600)
    assert r.returncode == 0, r.stderr
    big, used = (line.split() for line in r.stdout.strip().splitlines())
    assert big[:3] == ["256", "False", "278528"] and "over sm_90's 232448" in r.stdout, r.stdout
    assert used[1] == "True" and int(used[2]) < 232448, r.stdout


def test_only_picks_variants_by_label_and_names_a_label_that_matches_none(tmp_path):
    """`--only TEXT` compiles the variants whose label holds TEXT; a TEXT that no label holds is a clear error."""
    cmd = [sys.executable, "-m", "longspec_lab.kernels.compile_check", "--only"]
    env = _env(tmp_path)
    r = subprocess.run([*cmd, "nothing-is-called-this"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and "no kernel variant's label contains 'nothing-is-called-this'" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run([*cmd, "row top-k"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    from longspec_lab.kernels.compile_check import variants

    n = sum("row top-k" in label for label, *_ in variants())
    assert n == 2 and f"{n} of {n} kernel variants compiled for sm_90" in r.stdout, r.stdout


SPECIALISED = """
import torch
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend

from longspec_lab.kernels import compile_check as cc

# what a Llama-3-8B verify launch passes: q and the output [1, 32, 72, 128], the caches [1, 8, 4168, 128], the
# log-sum-exp [1, 32, 72]; Triton's own launch-time rule says how each stride is compiled
q, kv, lse = torch.empty(1, 32, 72, 128), torch.empty(1, 8, 4168, 128), torch.empty(1, 32, 72)
launch = {}
for t, x in (("q", q), ("k", kv), ("v", kv), ("o", q)):
    launch.update({f"stride_{t}{d}": s for d, s in zip("bhnd" if t in "kv" else "bhtd", x.stride())})
launch.update(stride_lb=lse.stride(0), stride_lh=lse.stride(1), stride_lt=lse.stride(2))
label = "tree split: lengths i32, plain loads, direct=False fused=True"
(_, fn, sig, cx, _), = [v for v in cc.variants() if v[0] == label]
for name, value in sorted(launch.items()):
    kind, spec = native_specialize_impl(BaseBackend, value, False, True, True)[:2]
    if kind == "constexpr":
        ours = "1" if sig[name] == "constexpr" and cx[(fn.arg_names.index(name),)] == 1 else sig[name]
    else:
        ours = "D" if name in cc.ALIGNED else ""
        spec = spec or ""
    print(name, kind, spec, ours, sep="|")
r, = cc.compile_all(progress=None, only=label)
print("compiled", r["ok"], r["shared_bytes"], r["async_loads"])
"""


def test_the_check_compiles_the_strides_as_a_launch_specialises_them(tmp_path):
    """A launch compiles an int equal to 1 as the constant 1 and a multiple of 16 as such (Triton's specialize_impl).
    The check compiled the attention kernels' strides as plain ints, so their K/V loads were not known to be
    contiguous and the key loop was not software-pipelined: 32 KiB of shared memory against the launch's 112 KiB.
    Every stride of a Llama-3-8B verify launch must now get the form Triton's own rule gives it, and the tree kernel's
    key loop then issues its loads ahead (cp.async), three stages of 64 x 128 K and V tiles."""
    r = subprocess.run([sys.executable, "-c", SPECIALISED], capture_output=True, text=True, env=_env(tmp_path),
                       timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    rows = [line.split("|") for line in lines[:-1]]
    assert len(rows) == 19, r.stdout
    units = 0
    for name, kind, launch, ours in rows:
        units += kind == "constexpr"
        if name[-1] in "bhtnd" and name[-2] in "qkvo" or kind == "constexpr":  # q, k, v, output; unit strides
            assert ours == launch, f"{name}: the launch compiles it as {launch!r}, the check as {ours!r}"
        else:  # the log-sum-exp's batch and head strides depend on the call (T = 1 at decode): assume nothing
            assert ours == "", f"{name}: the check assumes {ours!r}, which not every launch gives"
    assert units == 5, r.stdout  # the head-dim strides of q, k, v, the output, and the log-sum-exp's row stride
    _, ok, shared, async_loads = lines[-1].split()
    assert ok == "True" and int(async_loads) > 0, lines[-1]
    assert int(shared) >= 3 * 2 * 64 * 128 * 2, lines[-1]  # STAGES x (K, V) x BLOCK_N x D x 2 bytes


LOOP = """
import json
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from longspec_lab.kernels import compile_check as cc


@triton.jit
def online_softmax(Q, K, V, O, N, qk_scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                   WS: tl.constexpr):
    rows, cols = tl.arange(0, BLOCK_M), tl.arange(0, D)
    q = tl.load(Q + rows[:, None] * D + cols[None, :])
    k_desc = tl.make_tensor_descriptor(K, shape=[N, D], strides=[D, 1], block_shape=[BLOCK_N, D])
    v_desc = tl.make_tensor_descriptor(V, shape=[N, D], strides=[D, 1], block_shape=[BLOCK_N, D])
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for start in tl.range(0, N, BLOCK_N, num_stages=2, warp_specialize=WS):
        s = tl.dot(q, tl.trans(k_desc.load([start, 0]))) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(tl.bfloat16), v_desc.load([start, 0]), acc * alpha[:, None])
        m_i = m_new
    tl.store(O + rows[:, None] * D + cols[None, :], (acc / l_i[:, None]).to(tl.bfloat16))


sig = dict(Q="*bf16", K="*bf16", V="*bf16", O="*bf16", N="i32", qk_scale="fp32", BLOCK_M="constexpr",
           BLOCK_N="constexpr", D="constexpr", WS="constexpr")
for arch in (90, 100):
    for ws in (False, True):
        src = ASTSource(fn=online_softmax, signature=sig, constexprs={(6,): 128, (7,): 64, (8,): 128, (9,): ws},
                        attrs={(i,): [["tt.divisibility", 16]] for i in range(5)})
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 8})
        print(json.dumps({"arch": arch, "ws": ws, **cc.warp_specialization_of(k.asm)}))
"""


def test_the_warp_specialization_reading_sees_a_specialised_loop(tmp_path):
    """warp_specialization_of reads what the compiler did with `tl.range(warp_specialize=True)`. The same online-
    softmax loop (TMA loads, 128 x 64 tiles), compiled here for Blackwell (sm_100) and Hopper (sm_90): on sm_100 Triton
    splits it into warp partitions and the reading says `specialised`; asked for nothing, no arch specialises it. So
    the probe's `not specialised` for the tree kernel on sm_90 is the compiler's answer, not a reading that cannot
    say yes."""
    script = tmp_path / "loop.py"  # a file: @triton.jit reads the kernel's source
    script.write_text(LOOP)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=_env(tmp_path), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    got = {(d["arch"], d["ws"]): d for d in map(json.loads, r.stdout.strip().splitlines())}
    assert set(got) == {(90, False), (90, True), (100, False), (100, True)}
    for (arch, ws), d in got.items():
        assert d["asked"] == ws, d
        assert d["async_loads"] > 0, d  # the loop is pipelined either way
        if not ws:
            assert not d["specialised"], d
    assert got[(100, True)]["specialised"], got


CHAIN = """
import json

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from longspec_lab.kernels import compile_check as cc


@triton.jit
def chain(A, B, X, O, N, ROTATE: tl.constexpr):
    r = tl.arange(0, 64)
    a = tl.load(A + r[:, None] * 64 + r[None, :])
    acc = tl.zeros([64, 64], tl.float32)
    x = tl.load(X + r)
    for start in tl.range(0, N, 64, num_stages=3):
        b = tl.load(B + (start + r)[:, None] * 64 + r[None, :])
        if ROTATE:  # the product feeds the exp2 right after it
            x = x + tl.sum(tl.exp2(tl.dot(a, b)), 1)
        else:  # the product only accumulates, and the exp2 does not need it
            acc = tl.dot(a, b, acc)
            x = tl.exp2(x * 0.5)
    tl.store(O + r[:, None] * 64 + r[None, :], acc + x[:, None])


sig = dict(A="*bf16", B="*bf16", X="*fp32", O="*fp32", N="i32", ROTATE="constexpr")
for rotate in (False, True):
    src = ASTSource(fn=chain, signature=sig, constexprs={(5,): rotate},
                    attrs={(i,): [["tt.divisibility", 16]] for i in range(5)})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    print(json.dumps({"rotate": rotate, "under": cc.softmax_under_first_dot(k.asm["ttgir"])}))
"""


def test_the_overlap_reading_sees_a_product_kept_in_flight(tmp_path):
    """softmax_under_first_dot reads from the GPU IR whether a loop's first wgmma is still running when an exp2 runs.
    An accumulating product stays in flight (the compiler's wait lets one wgmma pend) under the exp2 that follows:
    True; a product the next exp2 needs is waited for at once: False. So the probe's False for the tree kernel's
    rotated loop is the compiler's schedule, not a reading that cannot say yes."""
    script = tmp_path / "chain.py"
    script.write_text(CHAIN)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=_env(tmp_path), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    got = {d["rotate"]: d["under"] for d in map(json.loads, r.stdout.strip().splitlines())}
    assert got == {False: True, True: False}, got


def test_the_probe_asks_for_warp_specialization_and_reads_the_rotated_loop(tmp_path, monkeypatch, capsys):
    """`compile_check --warp-specialize` compiles each of the tree kernel's Llama-3-8B verify cases (here the first,
    TMA loads in 64 x 64 tiles, to keep the suite short; data/results holds all six) twice, each in a child process:
    with warp specialization asked for and with the rotated loop. It records whether the request reached the
    compiler, what came of it, and whether the rotated loop's softmax runs under the next Q.K^T; the JSON is
    new-file-only, and a path that exists is refused without a traceback."""
    import json

    from longspec_lab.kernels import compile_check as cc

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(cc, "WS_CASES", cc.WS_CASES[:1])
    out = tmp_path / "ws.json"
    assert cc.main(["--warp-specialize", "--out", str(out)]) == 0
    (rec,) = json.loads(out.read_text())["warp_specialize_probe"]
    assert (rec["loads"], rec["BLOCK_M"], rec["BLOCK_N"], rec["num_warps"]) == ("TMA", 64, 64, 4)
    assert rec["outcome"] in ("specialised", "not specialised", "compiler aborted"), rec
    if rec["outcome"] != "compiler aborted":
        assert rec["asked"] and rec["outcome"] == ("specialised" if rec["specialised"] else "not specialised")
        assert rec["async_loads"] > 0, rec  # compiled as launched: the key loop pipelined
    assert rec["rotated_softmax_under_next_qk"] in (True, False) and rec["rotated_shared_bytes"] > 0, rec
    capsys.readouterr()
    assert cc.main(["--warp-specialize", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "never overwritten" in err and "Traceback" not in err
    assert cc.main(["--out", str(tmp_path / "other.json")]) == 2  # --out belongs to the probe
    assert "add --warp-specialize" in capsys.readouterr().err and not (tmp_path / "other.json").exists()


def test_a_constexpr_left_at_its_default_is_compiled_at_its_default():
    """The launches never pass the tree kernel's WARP_SPECIALIZE, so it takes its default, False, as a constexpr. The
    check once compiled it as a plain int argument, which asks for warp specialization on every variant (Triton 3.9's
    Hopper pass then rejected the prefix-only variant that the launches compile fine)."""
    from longspec_lab.kernels.compile_check import variants

    tree = [(label, fn, sig, cx) for label, fn, sig, cx, _ in variants() if label.startswith("tree split")]
    assert len(tree) == 11  # with the verify's tree on 32-key tiles, in one 128-row tile and in row tiles of 32 and 16
    for label, fn, sig, cx in tree:
        assert sig["WARP_SPECIALIZE"] == "constexpr" and cx[(fn.arg_names.index("WARP_SPECIALIZE"),)] is False, label


SPILL = """
import json

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from longspec_lab.kernels import compile_check as cc


@triton.jit
def rows_and_columns(X, Y, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)
    x = tl.load(X + r[:, None] * BLOCK + r[None, :])  # [BLOCK, BLOCK] fp32 held by one warp
    tl.store(Y + r[:, None] * BLOCK + r[None, :], tl.exp(x) * tl.sum(x, 1)[:, None] + tl.sum(x, 0)[None, :])


for block in (32, 128):  # 32 floats a thread, then 512: far past the 255 registers a thread may have
    src = ASTSource(fn=rows_and_columns, signature={"X": "*fp32", "Y": "*fp32", "BLOCK": "constexpr"},
                    constexprs={(2,): block})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 1})
    print(json.dumps({"block": block, **cc.resource_usage(k.asm["cubin"])}))
"""


def test_resource_usage_reads_registers_and_sees_a_spill(tmp_path):
    """compile_check's registers and spills come from cuobjdump's reading of each cubin. One warp holding a 32 x 32
    fp32 tile fits in registers, nothing spilled; holding 128 x 128 (512 floats a thread) it cannot, and the reading
    shows the spill (the stack frame), with the registers at their cap of 255 or under it."""
    script = tmp_path / "spill.py"
    script.write_text(SPILL)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=_env(tmp_path), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    small, big = (json.loads(line) for line in r.stdout.strip().splitlines())
    assert 0 < small["registers"] <= 255 and small["stack_bytes"] + small["local_bytes"] == 0, small
    assert 0 < big["registers"] <= 255 and big["stack_bytes"] + big["local_bytes"] >= 4 * 128 * 128 // 32 - 255 * 4, big
