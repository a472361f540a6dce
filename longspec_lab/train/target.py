"""Train the embedded target: a small Llama on the Python standard library (data/embedded).

LongSpec (arXiv 2502.17421) speeds up a long-context target with a tiny draft; to study that without
an 8B checkpoint, longspec_lab ships its own target: 8 layers, width 256, 4 query / 2 KV heads of dim 64,
SwiGLU 768, tied embeddings, vocab 4096, context 4096 (``PRESETS["embedded"]``, 7.3M parameters).

Recipe and why:
- next-token cross-entropy on random 4096-token windows (so RoPE sees every position the 4096 context uses;
  a model trained on 1024-token windows degrades past position 1024);
- the corpus is only 9.3M tokens, and a first calibration overfit after ~7 epochs (held-out loss flat at
  2.44 while train loss fell to 1.29). So: ~5.6 epochs in total (800 steps x 16 x 4096 tokens), AdamW with
  weight decay 0.1, cosine decay to 10% of the peak, and the checkpoint with the best held-out loss is the
  one saved (``eval_every`` steps apart);
- fp32 master weights, bf16 autocast on CUDA.

Output folder (Hugging Face layout): config.json (LlamaForCausalLM, bfloat16), model.safetensors (bf16,
tied weight stored once), generation_config.json, the tokenizer files, and train_log.json.

GPU run (token files made elsewhere, since the GPU host's stdlib differs):
    python -m longspec_lab.train.corpus --tokenize --out data/tokens
    python -m longspec_lab.train.target --tokens-dir data/tokens --out data/embedded --device cuda
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
import torch.nn as nn
import torch.nn.functional as F

from longspec_lab.models.config import PRESETS, ModelConfig
from longspec_lab.models.loaders import pick_device, save_hf
from longspec_lab.models.target import Target
from longspec_lab.models.tokenizer import copy_tokenizer_files, load_tokenizer, tokenizer_fingerprint
from longspec_lab.paths import DATA_DIR, TOKENIZER_DIR
from longspec_lab.train.corpus import TokenDataset, corpus_files, load_tokens, write_tokens

# The recommended run: ~52M tokens (~5.6 epochs of the 9.3M-token train split); about 1-2 min on one H200.
DEFAULTS = dict(
    steps=800,
    batch_size=16,
    seq_len=4096,
    lr=2e-3,
    min_lr_frac=0.1,
    warmup=50,
    weight_decay=0.1,
    grad_clip=1.0,
    seed=0,
    eval_every=50,
)


def init_weights(model: Target) -> None:
    """GPT-2 style: N(0, 0.02) everywhere, residual output projections scaled by 1/sqrt(2 * layers)."""
    std, n = 0.02, model.config.num_layers
    for name, p in model.named_parameters():
        if p.dim() == 1:  # RMSNorm gains -> 1, biases (if any) -> 0
            is_norm = name.endswith("layernorm.weight") or name == "model.norm.weight"
            nn.init.ones_(p) if is_norm else nn.init.zeros_(p)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            nn.init.normal_(p, 0.0, std / math.sqrt(2 * n))
        else:
            nn.init.normal_(p, 0.0, std)


def lr_at(step: int, steps: int, lr: float, warmup: int, min_lr_frac: float) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from ``lr`` down to ``lr * min_lr_frac``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, device: torch.device):
    decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices and the (tied) embedding
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # norms, biases
    groups = [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


def lm_loss(model: Target, batch: torch.Tensor) -> torch.Tensor:
    x, y = batch[:, :-1], batch[:, 1:]  # [B, T]
    logits = model(x)  # [B, T, V]
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


@torch.no_grad()
def evaluate(model: Target, windows: torch.Tensor, batch_size: int, device, autocast) -> float:
    """Mean next-token loss over fixed windows [N, T+1] (all windows have equal length)."""
    total, n = 0.0, 0
    for i in range(0, len(windows), batch_size):
        b = windows[i : i + batch_size].to(device, non_blocking=True)
        with autocast():
            total += lm_loss(model, b).item() * len(b)
        n += len(b)
    return total / n


def _autocast_factory(device: torch.device, dtype: str):
    if dtype in ("bf16", "bfloat16") and device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    if dtype in ("bf16", "bfloat16", "float32", "fp32"):
        return lambda: torch.autocast(device.type, enabled=False)
    raise ValueError(f"dtype {dtype!r} not supported for training; use 'bf16' (autocast on CUDA) or 'float32'")


def _check_tokens(tokens_dir: Path, cfg: ModelConfig, tokenizer_dir: Path) -> dict:
    meta_path = tokens_dir / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    want = tokenizer_fingerprint(tokenizer_dir)
    if meta.get("tokenizer_sha256", want) != want:
        raise ValueError(
            f"{tokens_dir} was tokenized with a different tokenizer than {tokenizer_dir}; "
            f"re-run `python -m longspec_lab.train.corpus --tokenize --out {tokens_dir}`"
        )
    for split in ("train", "heldout"):
        top = int(load_tokens(tokens_dir / f"{split}.u16").max())
        if top >= cfg.vocab_size:
            raise ValueError(
                f"{split}.u16 holds token id {top} but vocab_size={cfg.vocab_size}; "
                f"use a config whose vocab_size covers the tokenizer"
            )
    return meta


def train_target(
    cfg: ModelConfig,
    out_dir,
    steps: int = DEFAULTS["steps"],
    batch_size: int = DEFAULTS["batch_size"],
    seq_len: int = DEFAULTS["seq_len"],
    lr: float = DEFAULTS["lr"],
    warmup: int = DEFAULTS["warmup"],
    weight_decay: float = DEFAULTS["weight_decay"],
    seed: int = DEFAULTS["seed"],
    device=None,
    dtype: str = "bf16",
    eval_every: int = DEFAULTS["eval_every"],
    tokens_dir=DATA_DIR / "tokens",
    tokenizer_dir=TOKENIZER_DIR,
    min_lr_frac: float = DEFAULTS["min_lr_frac"],
    grad_clip: float = DEFAULTS["grad_clip"],
    max_eval_windows: int | None = None,
    save_dtype=torch.bfloat16,
    progress: bool = True,
) -> dict:
    """Train ``Target(cfg)`` and save the best-held-out checkpoint to ``out_dir``. Returns a summary dict."""
    if steps < 1 or batch_size < 1 or eval_every < 1:
        raise ValueError(f"steps, batch_size, eval_every must be >= 1 (got {steps}, {batch_size}, {eval_every})")
    if seq_len > cfg.max_position_embeddings:
        raise ValueError(f"seq_len={seq_len} exceeds the model context {cfg.max_position_embeddings}; lower --seq-len")
    tokens_dir, tokenizer_dir, out_dir = Path(tokens_dir), Path(tokenizer_dir), Path(out_dir)
    meta = _check_tokens(tokens_dir, cfg, tokenizer_dir)
    dev = pick_device(device)
    autocast = _autocast_factory(dev, dtype)
    torch.manual_seed(seed)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    train = TokenDataset(tokens_dir / "train.u16", seq_len, seed=seed)
    held = TokenDataset(tokens_dir / "heldout.u16", seq_len, seed=seed).eval_windows(max_eval_windows)
    n_probe = len(held)  # same number of fixed train windows, to watch the train/held-out gap
    train_probe = TokenDataset(tokens_dir / "train.u16", seq_len, seed=seed + 12345).batch(n_probe)

    model = Target(cfg).to(dev)
    init_weights(model)
    model.train()
    opt = make_optimizer(model, lr, weight_decay, dev)
    n_params = sum(p.numel() for p in model.parameters())

    losses, evals, best = [], [], dict(loss=float("inf"), step=-1, state=None)
    t0, tokens_per_step = time.time(), batch_size * seq_len

    def run_eval(step):
        model.eval()
        h = evaluate(model, held, batch_size, dev, autocast)
        tr = evaluate(model, train_probe, batch_size, dev, autocast)
        model.train()
        evals.append(dict(step=step, heldout_loss=h, train_probe_loss=tr, wall_s=time.time() - t0))
        if h < best["loss"]:
            best.update(loss=h, step=step, state={k: v.detach().clone() for k, v in model.state_dict().items()})
        return h

    bar = range(steps)
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(bar, desc="train-target", unit="step", dynamic_ncols=True)
    h = float("nan")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup, min_lr_frac)
        batch = train.batch(batch_size).to(dev, non_blocking=True)  # [B, T+1]
        with autocast():
            loss = lm_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            h = run_eval(step + 1)
        if progress:
            bar.set_postfix(
                loss=f"{losses[-1]:.3f}",
                heldout=f"{h:.3f}",
                best=f"{best['loss']:.3f}",
                lr=f"{opt.param_groups[0]['lr']:.1e}",
            )
    wall = time.time() - t0

    model.load_state_dict(best["state"])
    save_hf(model, out_dir, save_dtype)
    copy_tokenizer_files(out_dir, tokenizer_dir)
    summary = dict(
        out_dir=str(out_dir),
        steps=steps,
        tokens_seen=steps * tokens_per_step,
        epochs=steps * tokens_per_step / len(train),
        params=n_params,
        final_train_loss=float(np.mean(losses[-10:])),
        best_heldout_loss=best["loss"],
        best_step=best["step"],
        final_heldout_loss=evals[-1]["heldout_loss"],
        wall_s=wall,
    )
    log = dict(
        summary=summary,
        model_config=cfg.to_hf_dict(str(save_dtype).replace("torch.", "")),
        hparams=dict(
            batch_size=batch_size,
            seq_len=seq_len,
            lr=lr,
            min_lr_frac=min_lr_frac,
            warmup=warmup,
            weight_decay=weight_decay,
            grad_clip=grad_clip,
            seed=seed,
            eval_every=eval_every,
            dtype=dtype,
            betas=[0.9, 0.95],
            schedule="warmup+cosine",
        ),
        tokens=dict(dir=str(tokens_dir), train_tokens=len(train), heldout_windows=len(held), meta=meta),
        loss_curve=losses,
        evals=evals,
        device=dict(
            type=dev.type,
            name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine(),
        ),
        versions=dict(python=sys.version.split()[0], torch=torch.__version__, numpy=np.__version__),
    )
    (out_dir / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    if progress:
        print(
            f"saved {out_dir}: best held-out loss {best['loss']:.4f} at step {best['step']}, "
            f"train loss {summary['final_train_loss']:.4f}, {wall:.0f} s"
        )
    return summary


def smoke_tokens(out_dir, n_train_files: int = 40, tokenizer_dir=TOKENIZER_DIR) -> Path:
    """Small token files (first train files + held-out split) for a CPU smoke run."""
    tok, out_dir = load_tokenizer(tokenizer_dir), Path(out_dir)
    write_tokens(tok, [p.read_text("utf-8") for p in corpus_files("train")[:n_train_files]], out_dir / "train.u16")
    write_tokens(tok, [p.read_text("utf-8") for p in corpus_files("heldout")], out_dir / "heldout.u16")
    (out_dir / "meta.json").write_text(
        json.dumps(dict(tokenizer_sha256=tokenizer_fingerprint(tokenizer_dir), smoke=True))
    )
    return out_dir


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="longspec-lab train-target",
        description="Train the embedded target model on pre-tokenized stdlib code and "
        "save a Hugging Face folder (best held-out checkpoint).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = DEFAULTS
    ap.add_argument("--out", default=str(DATA_DIR / "embedded"), help="output model folder")
    ap.add_argument(
        "--tokens-dir",
        default=str(DATA_DIR / "tokens"),
        help="folder with train.u16/heldout.u16 from `python -m longspec_lab.train.corpus --tokenize`",
    )
    ap.add_argument("--tokenizer-dir", default=str(TOKENIZER_DIR), help="tokenizer copied into --out")
    ap.add_argument("--preset", default="embedded", choices=sorted(PRESETS), help="model shape")
    ap.add_argument("--steps", type=int, default=d["steps"], help="optimizer steps (~5.6 epochs at the defaults)")
    ap.add_argument("--batch-size", type=int, default=d["batch_size"], help="windows per step")
    ap.add_argument("--seq-len", type=int, default=d["seq_len"], help="training window (<= model context)")
    ap.add_argument("--lr", type=float, default=d["lr"], help="peak learning rate")
    ap.add_argument("--min-lr-frac", type=float, default=d["min_lr_frac"], help="final lr / peak lr")
    ap.add_argument("--warmup", type=int, default=d["warmup"], help="linear warmup steps before cosine decay")
    ap.add_argument("--weight-decay", type=float, default=d["weight_decay"], help="AdamW decay on matrices")
    ap.add_argument("--grad-clip", type=float, default=d["grad_clip"], help="0 disables")
    ap.add_argument("--eval-every", type=int, default=d["eval_every"], help="held-out eval period (steps)")
    ap.add_argument("--seed", type=int, default=d["seed"], help="init and data-order seed")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "float32"], help="bf16 = autocast on CUDA")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="a few CPU steps of the tiny preset on a handful of files (checks the pipeline)",
    )
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cfg = PRESETS[args.preset]
    kw = dict(
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        eval_every=args.eval_every,
        tokens_dir=args.tokens_dir,
        tokenizer_dir=args.tokenizer_dir,
        min_lr_frac=args.min_lr_frac,
        grad_clip=args.grad_clip,
        progress=not args.quiet,
    )
    if args.smoke:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = PRESETS["tiny"].replace(vocab_size=load_tokenizer(args.tokenizer_dir).get_vocab_size())
            kw.update(
                steps=20,
                batch_size=4,
                seq_len=128,
                lr=3e-3,
                warmup=2,
                eval_every=10,
                device="cpu",
                dtype="float32",
                tokens_dir=smoke_tokens(Path(tmp) / "tokens", tokenizer_dir=args.tokenizer_dir),
                max_eval_windows=8,
            )
            summary = train_target(
                cfg, args.out if args.out != str(DATA_DIR / "embedded") else Path(tmp) / "model", **kw
            )
    else:
        summary = train_target(cfg, args.out, **kw)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
