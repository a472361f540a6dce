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

The checkpoint is written whole or not at all (`output.py`): an occupied --out needs --overwrite, and a
non-finite loss stops the run with an error before anything is saved.

GPU run (token files made elsewhere, since the GPU host's stdlib differs):
    python -m longspec_lab.train.corpus --tokenize --out tokens
    longspec-lab train-target --tokens tokens --out my-target --device cuda

Taught in: notebooks/01_speculative_decoding_in_one_picture.ipynb (the embedded pair)
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
import torch.nn as nn
import torch.nn.functional as F

from longspec_lab.models.config import PRESETS, ModelConfig
from longspec_lab.models.loaders import pick_device, save_hf
from longspec_lab.models.target import Target
from longspec_lab.models.tokenizer import copy_tokenizer_files, load_tokenizer, tokenizer_fingerprint
from longspec_lab.paths import TOKENIZER_DIR
from longspec_lab.train.corpus import TokenDataset, corpus_files, load_tokens, write_tokens
from longspec_lab.train.output import check_finite, check_hparam, check_out_dir, fresh_out_dir, staged_dir

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
    tokens_dir=None,
    tokenizer_dir=TOKENIZER_DIR,
    min_lr_frac: float = DEFAULTS["min_lr_frac"],
    grad_clip: float = DEFAULTS["grad_clip"],
    max_eval_windows: int | None = None,
    save_dtype=torch.bfloat16,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Train ``Target(cfg)`` and save the best-held-out checkpoint to ``out_dir`` (new or empty, unless
    ``overwrite``; replaced only once the new checkpoint is complete and finite). Returns a summary dict."""
    for name, v, lo in (("steps", steps, 1), ("batch_size", batch_size, 1), ("eval_every", eval_every, 1)):
        check_hparam(name, v, lo, integer=True)
    check_hparam("seq_len", seq_len, 2, integer=True)
    check_hparam("warmup", warmup, 0, integer=True)
    check_hparam("lr", lr, 0, 10.0, low_open=True)
    check_hparam("weight_decay", weight_decay, 0, 10.0)
    check_hparam("min_lr_frac", min_lr_frac, 0, 1.0)
    check_hparam("grad_clip", grad_clip, 0)
    if tokens_dir is None:
        raise ValueError(
            "no token files given; make them with `python -m longspec_lab.train.corpus --tokenize --out tokens` "
            "and pass --tokens tokens"
        )
    check_out_dir(out_dir, overwrite)
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
        if not math.isfinite(losses[-1]):
            raise ValueError(
                f"the training loss became {losses[-1]} at step {step + 1}; nothing was saved to {out_dir}. "
                f"Lower --lr (now {lr:g}) or raise --warmup"
            )
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

    if best["state"] is None:
        raise ValueError(f"the held-out loss was never finite; nothing was saved to {out_dir}. Lower --lr (now {lr:g})")
    model.load_state_dict(best["state"])
    check_finite(model.named_parameters(), "the trained target")
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
    with staged_dir(out_dir, overwrite) as tmp:
        save_hf(model, tmp, save_dtype)
        copy_tokenizer_files(tmp, tokenizer_dir)
        (tmp / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
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


SMOKE = dict(
    steps=20,
    batch_size=4,
    seq_len=128,
    lr=3e-3,
    warmup=2,
    eval_every=10,
    device="cpu",
    dtype="float32",
    max_eval_windows=8,
)


def run_cli(args) -> int:
    """`longspec-lab train-target` after its flags are parsed and checked (see longspec_lab.cli)."""
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
        tokens_dir=args.tokens,
        tokenizer_dir=args.tokenizer_dir or TOKENIZER_DIR,
        min_lr_frac=args.min_lr_frac,
        grad_clip=args.grad_clip,
        progress=not args.quiet,
        overwrite=args.overwrite,
    )
    out = Path(args.out) if args.out else fresh_out_dir("smoke-target" if args.smoke else "target")
    check_out_dir(out, args.overwrite)
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            cfg = PRESETS["tiny"].replace(vocab_size=load_tokenizer(kw["tokenizer_dir"]).get_vocab_size())
            kw.update(SMOKE)
            if args.tokens is None:
                kw["tokens_dir"] = smoke_tokens(Path(tmp) / "tokens", tokenizer_dir=kw["tokenizer_dir"])
        summary = train_target(cfg, out, **kw)
    print(json.dumps(summary, indent=1))
    print(f"wrote the target to {out}")
    return 0


if __name__ == "__main__":  # the old spelling, `python -m longspec_lab.train.target`, runs the CLI's subcommand
    import runpy

    sys.argv = ["longspec-lab", "train-target", *sys.argv[1:]]
    runpy.run_module("longspec_lab", run_name="__main__", alter_sys=True)
