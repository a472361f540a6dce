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

Training data: token files (`tokens_dir`, the stdlib corpus of `corpus.py`) or your own text
(`text`: a folder of files or a JSONL, tokenized with the target's tokenizer by `text.py`).
The draft is written whole or not at all (`output.py`): an occupied folder needs overwrite=True, and a
non-finite loss or weight stops the run with an error before anything is saved.

    longspec-lab train-draft --help

Taught in: notebooks/05_the_glide_draft.ipynb
"""

from __future__ import annotations

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
from longspec_lab.paths import EMBEDDED_TARGET
from longspec_lab.train.corpus import TokenDataset, token_file
from longspec_lab.train.output import check_finite, check_hparam, check_out_dir, fresh_out_dir, staged_dir

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


_INT_MIN = dict(
    steps=1, batch_size=1, seq_len=2, warmup=0, window=1, max_staleness=0, eval_every=0, eval_windows=1, max_sinks=0
)


def _check_args(hp: dict) -> None:
    for name, lo in _INT_MIN.items():
        check_hparam(name, hp[name], lo, integer=True)
    check_hparam("log_every", hp["log_every"], 1, integer=True)
    check_hparam("lr", hp["lr"], 0, 10.0, low_open=True)
    check_hparam("kd_weight", hp["kd_weight"], 0, 1e6)
    check_hparam("weight_decay", hp["weight_decay"], 0, 10.0)
    if hp["max_seconds"] is not None:
        check_hparam("max_seconds", hp["max_seconds"], 0, low_open=True)


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
    text=None,
    overwrite=False,
) -> dict:
    """Train a GliDe draft for the target in `target_dir` on token files (`tokens_dir`) or on your own
    text (`text`: a folder of text files or a JSONL, tokenized with the target's own tokenizer); writes
    draft.safetensors, draft_config.json and train_log.json into `out_dir` and returns the log.

    Everything is checked before any work; `out_dir` must be new or empty unless `overwrite`, and it
    is replaced only once the new draft is complete and finite."""
    hp = dict(
        steps=steps,
        batch_size=batch_size,
        seq_len=seq_len,
        lr=lr,
        warmup=warmup,
        seed=seed,
        kd_weight=kd_weight,
        window=window,
        max_staleness=max_staleness,
        eval_every=eval_every,
        eval_windows=eval_windows,
        max_sinks=max_sinks,
        weight_decay=weight_decay,
        max_seconds=max_seconds,
        log_every=log_every,
    )
    _check_args(hp)
    if (tokens_dir is None) == (text is None):
        raise ValueError(
            "give the training data one way: tokens_dir (token files from `python -m longspec_lab.train.corpus "
            "--tokenize`) or text (a folder of text files or a JSONL)"
        )
    check_out_dir(out_dir, overwrite)
    t0 = time.time()
    torch.manual_seed(seed)
    dev = pick_device(device)
    target = load_target(target_dir, dev, pick_dtype(dtype, dev)).requires_grad_(False)
    tcfg = target.config
    if seq_len > tcfg.max_position_embeddings:
        raise ValueError(
            f"seq_len={seq_len} exceeds the target's context of {tcfg.max_position_embeddings}; use a shorter --seq-len"
        )
    extra = dict(text=None if text is None else str(text), command=command or " ".join(sys.argv))
    with tempfile.TemporaryDirectory() as tmp:
        if text is not None:
            from transformers import AutoTokenizer

            from longspec_lab.train.text import tokenize_text

            tok = AutoTokenizer.from_pretrained(str(target_dir))
            eos = tok.eos_token_id if tok.eos_token_id is not None else (tcfg.eos_ids[0] if tcfg.eos_ids else None)
            tokens_dir = tokenize_text(
                text,
                tok,
                tmp,
                tcfg.vocab_size,
                eos,
                min_tokens=seq_len + 1,
                heldout_tokens=eval_windows * seq_len + 1,
                progress=progress,
            )
        return _train(target, target_dir, out_dir, Path(tokens_dir), hp, dev, progress, t0, extra, overwrite)


def _train(target, target_dir, out_dir, tokens_dir, hp, dev, progress, t0, extra, overwrite) -> dict:
    steps, batch_size, seq_len, lr = hp["steps"], hp["batch_size"], hp["seq_len"], hp["lr"]
    warmup, seed, kd_weight, window = hp["warmup"], hp["seed"], hp["kd_weight"], hp["window"]
    max_staleness, eval_every = hp["max_staleness"], hp["eval_every"]
    eval_windows, max_sinks, weight_decay = hp["eval_windows"], hp["max_sinks"], hp["weight_decay"]
    max_seconds, log_every = hp["max_seconds"], hp["log_every"]
    tcfg = target.config
    train = TokenDataset(token_file(tokens_dir, "train"), seq_len, seed)
    held = TokenDataset(token_file(tokens_dir, "heldout"), seq_len, seed)
    for ds, name in ((train, "train"), (held, "heldout")):
        top = int(np.max(ds.tokens))
        if top >= tcfg.vocab_size:
            raise ValueError(
                f"{name} tokens in {tokens_dir} hold id {top} but the target's vocabulary has "
                f"{tcfg.vocab_size} ids; tokenise with the target's tokenizer (or use --text)"
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
            if not torch.isfinite(loss):
                raise ValueError(
                    f"the training loss became {loss.item()} at step {step}; nothing was saved to {out_dir}. "
                    f"Lower --lr (now {lr:g}) or --kd-weight (now {kd_weight:g})"
                )
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
    check_finite(draft.named_parameters(), "the trained draft")
    if not all(math.isfinite(v) for v in final["staleness0"].values()):
        raise ValueError(
            f"the held-out loss is not finite ({final['staleness0']}); nothing was saved to {out_dir}. "
            f"Lower --lr (now {lr:g})"
        )
    log.update(
        steps=step,
        stopped_early=stopped_early,
        tokens_seen=step * batch_size * seq_len,
        final_eval=final,
        wall_seconds=round(time.time() - t0, 2),
        device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        versions=dict(python=platform.python_version(), torch=torch.__version__),
        **extra,
    )
    with staged_dir(out_dir, overwrite) as tmp:
        save_draft(draft, tmp)
        (tmp / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
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


SMOKE = dict(steps=20, batch_size=2, seq_len=64, warmup=2, device="cpu", dtype="float32", eval_every=0, eval_windows=4)


def run_cli(args) -> int:
    """`longspec-lab train-draft` after its flags are parsed and checked (see longspec_lab.cli)."""
    kw = dict(
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        warmup=args.warmup,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        kd_weight=args.kd_weight,
        window=args.window,
        max_staleness=args.max_staleness,
        progress=not args.quiet,
        eval_every=args.eval_every,
        eval_windows=args.eval_windows,
        max_sinks=args.max_sinks,
        weight_decay=args.weight_decay,
        max_seconds=args.max_seconds,
        command=args.command_line,
        overwrite=args.overwrite,
    )
    out = Path(args.out) if args.out else fresh_out_dir("smoke-draft" if args.smoke else "draft")
    check_out_dir(out, args.overwrite)
    with tempfile.TemporaryDirectory() as tmp:
        target, tokens = args.model, args.tokens
        if args.smoke:
            kw.update(SMOKE, window=min(args.window, 32))
            if target is None:
                target = EMBEDDED_TARGET if (EMBEDDED_TARGET / "config.json").is_file() else _smoke_target(Path(tmp))
            if tokens is None and args.text is None:
                from longspec_lab.train.target import smoke_tokens

                tokens = smoke_tokens(Path(tmp) / "tokens", n_train_files=10)
        elif target is None:
            target = EMBEDDED_TARGET
        log = train_draft(target, out, tokens_dir=tokens, text=args.text, **kw)
    summary = {k: log[k] for k in ("steps", "tokens_seen", "wall_seconds", "final_eval", "device")}
    print(json.dumps(summary, indent=1))
    print(f"wrote the draft to {out}; use it with: longspec-lab generate --model {target} --draft {out}")
    return 0


if __name__ == "__main__":  # the old spelling, `python -m longspec_lab.train.draft`, runs the CLI's subcommand
    import runpy

    sys.argv = ["longspec-lab", "train-draft", *sys.argv[1:]]
    runpy.run_module("longspec_lab", run_name="__main__", alter_sys=True)
