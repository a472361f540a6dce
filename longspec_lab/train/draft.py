"""Train the one-layer GliDe draft against a frozen target (LongSpec, arXiv 2502.17421, §2).

Per batch:
  1. anchor-offset position ids: keep the first k in 0..4 "sink" positions as they are and shift the
     rest by a random offset, so short training windows reach the large positions of long-context
     inference (positions up to max_position_embeddings - 1); target and draft see the same ids;
  2. run the frozen target once with a KV cache to get its last-layer K/V and its logits;
  3. draft loss = CE(next token) + kd_weight * KL(target || draft) at temperature 1, with the draft's
     view of the target cache `staleness` tokens behind (sampled in 0..max_staleness per batch), as
     tree nodes at depth d see it at inference.
Held-out evaluation reports the loss and how often the target's greedy token is in the draft's
top-1 / top-4 / top-16: the quantities that bound a tree's acceptance.

    python -m longspec_lab.train.draft --help
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from longspec_lab.models.cache import KVCache
from longspec_lab.models.draft_io import save_draft
from longspec_lab.models.glide import DraftConfig, Glide
from longspec_lab.models.loaders import load_target, pick_device, pick_dtype
from longspec_lab.paths import DATA_DIR
from longspec_lab.train.corpus import TokenDataset

TOPK = (1, 4, 16)


def anchor_positions(batch: int, seq_len: int, max_pos: int, gen: torch.Generator, max_sinks: int = 4):
    """[B, T] position ids: row b keeps [0, k_b) and shifts the rest by a random offset_b, so that
    its last position is at most max_pos - 1 (k_b uniform in 0..max_sinks)."""
    if seq_len > max_pos:
        raise ValueError(
            f"seq_len={seq_len} exceeds the target's max_position_embeddings={max_pos}; use a shorter --seq-len"
        )
    k = torch.randint(0, max_sinks + 1, (batch, 1), generator=gen)
    offset = torch.randint(0, max_pos - seq_len + 1, (batch, 1), generator=gen)
    pos = torch.arange(seq_len)[None].expand(batch, seq_len)
    return pos + torch.where(pos >= k, offset, torch.zeros_like(offset))


class TargetRunner:
    """The frozen target's logits and last-layer K/V for a batch (one reusable KV cache per shape)."""

    def __init__(self, target, backend: str):
        self.target, self.backend, self.caches = target, backend, {}

    @torch.no_grad()
    def __call__(self, x, positions):
        B, T = x.shape
        c = self.target.config
        if (B, T) not in self.caches:
            self.caches[(B, T)] = KVCache(c.num_layers, B, c.num_kv_heads, T, c.head_dim, self.target.dtype, x.device)
        cache = self.caches[(B, T)]
        logits = self.target(x, positions=positions, cache=cache, start=0, backend=self.backend)
        return logits.float(), cache.k[-1], cache.v[-1]  # [B, T, V], [B, Hkv, T, D] x 2


def draft_losses(draft, x, y, positions, t_logits, tk, tv, staleness: int, kd_weight: float, amp):
    with torch.autocast("cuda" if amp else "cpu", dtype=torch.bfloat16, enabled=amp):
        d_logits = draft.forward_train(x, positions, tk, tv, staleness)
    logq = F.log_softmax(d_logits.float(), dim=-1)  # [B, T, V]
    ce = F.nll_loss(logq.flatten(0, 1), y.flatten())
    logp = F.log_softmax(t_logits, dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1).mean()
    return ce + kd_weight * kl, ce, kl, d_logits


@torch.no_grad()
def evaluate(draft, runner, windows, positions, batch_size, staleness, kd_weight, amp, device):
    """Held-out loss and top-k agreement with the target's greedy token."""
    tot = dict(loss=0.0, ce=0.0, kl=0.0, **{f"top{k}": 0.0 for k in TOPK})
    n_tok = 0
    for i in range(0, len(windows), batch_size):
        w = windows[i : i + batch_size].to(device)
        pos = positions[i : i + batch_size].to(device)
        x, y = w[:, :-1], w[:, 1:]
        t_logits, tk, tv = runner(x, pos)
        loss, ce, kl, d_logits = draft_losses(draft, x, y, pos, t_logits, tk, tv, staleness, kd_weight, amp)
        n = x.numel()
        for name, val in (("loss", loss), ("ce", ce), ("kl", kl)):
            tot[name] += float(val) * n
        greedy = t_logits.argmax(-1, keepdim=True)  # [B, T, 1]
        top = d_logits.topk(max(TOPK), dim=-1).indices  # [B, T, 16]
        for k in TOPK:
            tot[f"top{k}"] += float((top[..., :k] == greedy).any(-1).sum())
        n_tok += n
    return {k: round(v / n_tok, 5) for k, v in tot.items()}


def train_draft(
    target_dir,
    out_dir,
    steps=4000,
    batch_size=32,
    seq_len=1024,
    lr=2e-3,
    warmup=200,
    seed=0,
    device=None,
    dtype=None,
    tokens_dir=None,
    kd_weight=1.0,
    window=512,
    max_staleness=4,
    progress=True,
    eval_every=1000,
    eval_windows=64,
    max_sinks=4,
    weight_decay=0.0,
    max_seconds=None,
    log_every=10,
    command=None,
) -> dict:
    """Train a GliDe draft for the target in `target_dir`; writes draft.safetensors, draft_config.json and
    train_log.json into `out_dir` and returns the log as a dict."""
    t0 = time.time()
    torch.manual_seed(seed)
    dev = pick_device(device)
    target = load_target(target_dir, dev, pick_dtype(dtype, dev)).requires_grad_(False)
    tcfg = target.config
    tokens_dir = Path(tokens_dir or DATA_DIR / "tokens")
    train = TokenDataset(tokens_dir / "train.u16", seq_len, seed)
    held = TokenDataset(tokens_dir / "heldout.u16", seq_len, seed)
    for ds, name in ((train, "train"), (held, "heldout")):
        top = int(np.max(ds.tokens))
        if top >= tcfg.vocab_size:
            raise ValueError(
                f"{name}.u16 holds token id {top} but the target's vocabulary has "
                f"{tcfg.vocab_size} ids; tokenise with the target's tokenizer"
            )
    gen = torch.Generator().manual_seed(seed)
    windows = held.eval_windows(eval_windows)
    eval_pos = anchor_positions(
        len(windows), seq_len, tcfg.max_position_embeddings, torch.Generator().manual_seed(seed + 1), max_sinks
    )
    draft = Glide(DraftConfig.from_target(tcfg, window=window), target).to(dev, torch.float32)
    amp = dev.type == "cuda"
    runner = TargetRunner(target, "sdpa")
    opt = torch.optim.AdamW(draft.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay, fused=amp)

    def lr_at(step):  # linear warm-up, then cosine down to 10% of lr
        if step < warmup:
            return (step + 1) / warmup
        frac = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    log = dict(
        target=str(target_dir),
        out=str(out_dir),
        tokens=str(tokens_dir),
        steps_planned=steps,
        batch_size=batch_size,
        seq_len=seq_len,
        lr=lr,
        warmup=warmup,
        seed=seed,
        kd_weight=kd_weight,
        window=window,
        max_staleness=max_staleness,
        max_sinks=max_sinks,
        weight_decay=weight_decay,
        draft_params=sum(p.numel() for p in draft.parameters()),
        losses=[],
        evals=[],
    )

    def run_eval(step):
        draft.eval()
        e = dict(step=step)
        for s in sorted({0, max_staleness}):
            e[f"staleness{s}"] = evaluate(draft, runner, windows, eval_pos, batch_size, s, kd_weight, amp, dev)
        draft.train()
        log["evals"].append(e)
        return e

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="draft", dynamic_ncols=True)
    draft.train()
    step, stopped_early = 0, False
    while step < steps:
        w = train.batch(batch_size).to(dev)
        x, y = w[:, :-1], w[:, 1:]
        pos = anchor_positions(batch_size, seq_len, tcfg.max_position_embeddings, gen, max_sinks).to(dev)
        staleness = int(torch.randint(0, max_staleness + 1, (1,), generator=gen))
        t_logits, tk, tv = runner(x, pos)
        loss, ce, kl, _ = draft_losses(draft, x, y, pos, t_logits, tk, tv, staleness, kd_weight, amp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        loss, ce, kl = loss.detach(), ce.detach(), kl.detach()
        if step % log_every == 0 or step <= 3 or step == steps:
            log["losses"].append(
                dict(
                    step=step,
                    loss=round(loss.item(), 5),
                    ce=round(ce.item(), 5),
                    kl=round(kl.item(), 5),
                    staleness=staleness,
                    lr=float(sched.get_last_lr()[0]),
                )
            )
        if bar is not None:
            bar.update(1)
            if step % log_every == 0:
                bar.set_postfix(loss=f"{float(loss):.3f}", ce=f"{float(ce):.3f}")
        if eval_every and step % eval_every == 0 and step < steps:
            e = run_eval(step)
            if bar is not None:
                bar.write(f"step {step}: held-out {e['staleness0']}")
        if max_seconds is not None and time.time() - t0 > max_seconds and step < steps:
            stopped_early = True
            break
    if bar is not None:
        bar.close()
    final = run_eval(step)
    draft = draft.to(target.dtype).eval()
    save_draft(draft, out_dir)
    log.update(
        steps=step,
        stopped_early=stopped_early,
        tokens_seen=step * batch_size * seq_len,
        final_eval=final,
        wall_seconds=round(time.time() - t0, 2),
        device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        versions=dict(python=platform.python_version(), torch=torch.__version__),
        command=command or " ".join(sys.argv),
    )
    (Path(out_dir) / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    return log


def _smoke_target(tmp: Path) -> Path:
    """A small random target (vocab 4096, so it reads the shipped token files) for --smoke."""
    from longspec_lab.models.config import PRESETS
    from longspec_lab.models.loaders import save_hf
    from longspec_lab.models.target import Target

    torch.manual_seed(0)
    t = Target(PRESETS["tiny"].replace(vocab_size=4096))
    torch.nn.init.normal_(t.model.embed_tokens.weight, std=0.2)  # N(0, 1) would make logits one-hot
    return save_hf(t, tmp / "smoke_target", torch.float32)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m longspec_lab.train.draft",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train the one-layer GliDe draft (LongSpec §2) against a frozen target: anchor-offset "
        "positions, CE + KD loss, staleness-aware cross-attention. Writes draft.safetensors, "
        "draft_config.json and train_log.json into --out.",
    )
    ap.add_argument(
        "--target", default=str(DATA_DIR / "embedded"), help="target checkpoint folder (config.json + *.safetensors)"
    )
    ap.add_argument("--out", default=str(DATA_DIR / "embedded-draft"), help="output folder for the draft")
    ap.add_argument(
        "--tokens",
        default=str(DATA_DIR / "tokens"),
        help="folder with train.u16 / heldout.u16 (python -m longspec_lab.train.corpus --tokenize)",
    )
    ap.add_argument("--steps", type=int, default=4000, help="optimizer steps")
    ap.add_argument("--batch-size", type=int, default=32, help="sequences per step")
    ap.add_argument("--seq-len", type=int, default=1024, help="tokens per training sequence")
    ap.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (cosine to 10%%)")
    ap.add_argument("--warmup", type=int, default=200, help="linear warm-up steps")
    ap.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    ap.add_argument("--kd-weight", type=float, default=1.0, help="weight of KL(target || draft) next to CE")
    ap.add_argument("--window", type=int, default=512, help="draft self-attention sliding window W")
    ap.add_argument(
        "--max-staleness",
        type=int,
        default=4,
        help="draft's view of the target cache is 0..this many tokens stale (sampled per batch)",
    )
    ap.add_argument("--max-sinks", type=int, default=4, help="anchor positions kept unshifted: 0..this many")
    ap.add_argument("--eval-every", type=int, default=1000, help="held-out evaluation period (0 = only at the end)")
    ap.add_argument("--eval-windows", type=int, default=64, help="held-out windows of --seq-len per evaluation")
    ap.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="stop early (and still evaluate and save) after this much wall time",
    )
    ap.add_argument("--seed", type=int, default=0, help="random seed (data order, positions, init)")
    ap.add_argument("--device", default=None, help="cpu / cuda / cuda:1 (default: cuda if available)")
    ap.add_argument("--dtype", default=None, help="target dtype: bf16 / fp16 / float32 (default: bf16 on GPU)")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="a few CPU steps (20 x 2 x 64 tokens) to check the pipeline; uses a random tiny "
        "target when --target does not exist and writes to a temp folder unless --out is given",
    )
    args = ap.parse_args(argv)
    kw = dict(
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        warmup=args.warmup,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        tokens_dir=args.tokens,
        kd_weight=args.kd_weight,
        window=args.window,
        max_staleness=args.max_staleness,
        progress=not args.no_progress,
        eval_every=args.eval_every,
        eval_windows=args.eval_windows,
        max_sinks=args.max_sinks,
        weight_decay=args.weight_decay,
        max_seconds=args.max_seconds,
        command="python -m longspec_lab.train.draft " + " ".join(sys.argv[1:] if argv is None else argv),
    )
    with tempfile.TemporaryDirectory() as tmp:
        target, out = args.target, args.out
        if args.smoke:
            kw.update(
                steps=20,
                batch_size=2,
                seq_len=64,
                warmup=2,
                device="cpu",
                dtype="float32",
                eval_every=0,
                eval_windows=4,
                window=min(args.window, 32),
            )
            if not Path(target).is_dir():
                target = _smoke_target(Path(tmp))
            if "--out" not in (sys.argv if argv is None else argv):
                out = Path(tmp) / "smoke_draft"
        log = train_draft(target, out, **kw)
    summary = {k: log[k] for k in ("steps", "tokens_seen", "wall_seconds", "final_eval", "device")}
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
