"""The eager loop: autoregressive, chain and tree speculative decoding, greedy or sampled.

Every loop is the same pipeline of stages (LongSpec, arXiv 2502.17421; docs/LONGSPEC.md section 1):

    prefill -> [ draft (tree) -> verify (one target pass) -> accept -> commit ] * steps

`SpecDecoder` runs the stage functions of `decoding.steps` one after another and reads the step's
outcome back to the host after each step (to cut at max_new_tokens or EOS, and to record a trace).
It holds no maths of its own: the stages come from `steps`, the tree from `spec.draft`, acceptance
from `spec.verify`, the commit from `spec.commit`. A chain of gamma is the tree [1] * gamma, so chain
and tree share one code path. `graphs.GraphDecoder` captures the same stage functions.

Sampling (temperature > 0, `verify=`; docs/LONGSPEC.md section 4): the target's tokens come from
`ops.sampling.probs_from_logits` (temperature, top-k, top-p as transformers applies them) with an explicit
seeded torch.Generator. Drafting depends on the rule: "target-sample" verifies the usual beam tree,
"rrs" / "chain" a tree / chain SAMPLED from the draft (q recorded per node), and the biased
counter-example "naive-topk" the beam tree with q recorded. "greedy" at temperature > 0 is an error.
The `transformers` spellings work too: `do_sample=True` picks "target-sample" (ar) or "rrs" (tree) /
"chain" (chain) unless `verify` is given.

Taught in: notebooks/01_speculative_decoding_in_one_picture.ipynb and notebooks/03_one_step_slowly.ipynb.
"""

from __future__ import annotations

import functools
import numbers
import operator
import time
import warnings

import torch

from longspec_lab.decoding import steps
from longspec_lab.decoding.timing import StageTimer
from longspec_lab.ops.attention import check_backend, default_backend
from longspec_lab.ops.sampling import SamplingParams, make_generator, probs_from_logits, sample_categorical
from longspec_lab.spec.trace import GenerationResult, StepRecord
from longspec_lab.spec.tree import DEFAULT_TREE_SHAPE, MAX_TREE_DEPTH, TreeShape, check_tree_limits
from longspec_lab.spec.verify import LOSSLESS_SAMPLING_RULES, VERIFY_RULES, split_stats

METHODS = ("ar", "chain", "tree")
BATCH_INVARIANT_ROWS = 128  # rows of every target pass in batch-invariant mode (>= the largest tree)


def check_verify(method: str, verify: str, params: SamplingParams, shape) -> None:
    """Which verification rules fit which method and temperature (raises ValueError naming the fix)."""
    lossless = ", ".join(repr(r) for r in LOSSLESS_SAMPLING_RULES)
    if verify not in VERIFY_RULES:
        raise ValueError(f"verify={verify!r} is unknown; use one of {', '.join(map(repr, VERIFY_RULES))}")
    if verify == "greedy" and not params.greedy:
        raise ValueError(
            f"verify='greedy' is only lossless at temperature 0 (got {params.temperature}); "
            f"use temperature=0, or a lossless sampling rule: {lossless}"
        )
    if method == "ar" and verify not in ("greedy", "target-sample"):
        raise ValueError(
            f"method='ar' drafts nothing for verify={verify!r} to check; use verify='target-sample' "
            "(plain sampling) or 'greedy'"
        )
    if method == "chain" and verify == "rrs":
        raise ValueError(
            "verify='rrs' needs a tree of sampled siblings, but method='chain' drafts a chain; use "
            "verify='chain' (rrs on a chain is the chain rule) or method='tree'"
        )
    if verify == "chain" and method != "chain" and any(w != 1 for w in shape.widths):
        raise ValueError(
            f"verify='chain' needs a chain, got tree_shape {list(shape.widths)}; use method='chain' "
            "or verify='rrs' / 'target-sample' for a tree"
        )


def check_prompt(prompt_ids, vocab_size: int, device) -> torch.Tensor:
    """A prompt as a 1-D long tensor on `device`, or a ValueError naming what is wrong and the fix:
    token ids must be integers (a list, or an integer tensor of shape [T] or [1, T]) in [0, vocab)."""
    fix = "pass token ids, e.g. tokenizer.encode(text) or a LongTensor of shape [T]"
    if prompt_ids is None or isinstance(prompt_ids, (str, bytes)):
        raise ValueError(f"the prompt must be token ids, got {type(prompt_ids).__name__}; {fix}")
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dtype.is_floating_point or prompt_ids.dtype.is_complex or prompt_ids.dtype == torch.bool:
            raise ValueError(f"the prompt tensor has dtype {prompt_ids.dtype}, not integer token ids; {fix}")
        ids = prompt_ids.detach().to("cpu", torch.long)
    else:
        try:
            items = list(prompt_ids)
        except TypeError:
            raise ValueError(f"the prompt must be a sequence of token ids, got {type(prompt_ids).__name__}; {fix}")
        flat = [x for row in items for x in row] if items and isinstance(items[0], (list, tuple)) else items
        if any(isinstance(x, bool) or not isinstance(x, numbers.Integral) for x in flat):
            bad = next(x for x in flat if isinstance(x, bool) or not isinstance(x, numbers.Integral))
            raise ValueError(f"the prompt holds {bad!r} ({type(bad).__name__}), not an integer token id; {fix}")
        try:
            ids = torch.tensor(items, dtype=torch.long)
        except (ValueError, TypeError, RuntimeError, OverflowError) as e:
            raise ValueError(f"the prompt is not a rectangular list of token ids ({e}); {fix}") from None
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"prompt_ids must be a 1-D list of token ids (batch 1), got shape {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise ValueError("the prompt is empty; give at least one token (e.g. the BOS token or some text)")
    bad = (ids < 0) | (ids >= vocab_size)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(
            f"prompt token {int(ids[i])} at position {i} is outside the vocabulary [0, {vocab_size}); "
            "encode the text with this model's tokenizer"
        )
    return ids.to(device)


def resolve_sampling(method, verify, do_sample, temperature):
    """The verification rule from `verify` and the transformers spelling `do_sample`."""
    if do_sample is None:
        return verify or "greedy"
    if not isinstance(do_sample, bool):
        raise ValueError(f"do_sample={do_sample!r} must be True or False")
    if not do_sample:
        if verify not in (None, "greedy"):
            raise ValueError(f"do_sample=False conflicts with verify={verify!r}; drop one of them")
        if temperature:
            raise ValueError(f"do_sample=False conflicts with temperature={temperature}; drop one of them")
        return "greedy"
    if verify == "greedy":
        raise ValueError("do_sample=True conflicts with verify='greedy'; drop one of them")
    return verify or {"ar": "target-sample", "chain": "chain", "tree": "rrs"}.get(method, "rrs")


DEFAULT_GAMMA = 4  # a chain's draft tokens per step when generate is not told


def _whole(value, name: str, what: str) -> int:
    """value as an int >= 1 (Python, numpy or 0-d tensor integers; not bool), or a ValueError naming it."""
    try:
        if isinstance(value, bool):
            raise TypeError
        n = operator.index(value)
    except TypeError:
        raise ValueError(f"{name}={value!r} must be an integer >= 1 ({what})") from None
    if n < 1:
        raise ValueError(f"{name}={n} must be an integer >= 1 ({what})")
    return n


def _check_models(target, draft) -> None:
    """The decoder's two models: a Target, and None or a GliDe draft built for a target of this shape."""
    from longspec_lab.models.glide import Glide, check_fits
    from longspec_lab.models.target import Target

    if not isinstance(target, Target):
        hint = (
            " (the arguments are the other way round: SpecDecoder(target, draft))" if isinstance(target, Glide) else ""
        )
        raise TypeError(
            f"the target must be a longspec_lab Target (load_target or load_pair), got {type(target).__name__}{hint}"
        )
    if draft is None:
        return
    if not isinstance(draft, Glide):
        raise TypeError(
            f"the draft must be a GliDe draft (load_draft or load_pair) or None, got {type(draft).__name__}"
        )
    check_fits(draft.config, target.config)
    if draft.target is not target:
        warnings.warn(
            "the draft was built on another Target object, whose embeddings, RoPE and LM head it keeps using; "
            "load it for this one (load_draft(path, target)) unless the two hold the same weights",
            stacklevel=3,
        )


def _warn_ignored(method, tree_shape, gamma, top_k, top_p, temperature, do_sample) -> None:
    """A warning for each argument that this call leaves unused (the command line refuses them)."""
    unused = []
    if method != "tree" and tree_shape is not DEFAULT_TREE_SHAPE:
        unused.append(
            f"tree_shape (used by method='tree'; method={method!r}" + (" takes gamma)" if method == "chain" else ")")
        )
    if method != "chain" and gamma != DEFAULT_GAMMA:
        unused.append(f"gamma (used by method='chain'; method={method!r})")
    greedy = not do_sample and not temperature
    if greedy and (top_k is not None or top_p is not None):
        unused.append("top_k / top_p (they shape sampling: pass temperature > 0 or do_sample=True)")
    for u in unused:
        warnings.warn(f"{u} is ignored in this call", stacklevel=4)


class SpecDecoder:
    """Decoding of one sequence with a target, and optionally a GliDe draft (the readable eager loop).

    `generate` validates everything before it touches a buffer, and builds its buffers on each call,
    so a call that raised leaves the decoder usable."""

    def __init__(
        self,
        target,
        draft=None,
        backend: str | None = None,
        tokenizer=None,
        max_cache_len: int | None = None,
        batch_invariant: bool | int = False,
    ):
        _check_models(target, draft)
        self.target, self.draft, self.tokenizer = target, draft, tokenizer
        self.backend = check_backend(backend or default_backend(target.device), target.device)
        if max_cache_len is not None:
            max_cache_len = _whole(max_cache_len, "max_cache_len", "cache slots, or None to size it per call")
        self.max_cache_len = max_cache_len  # None: sized per call from the prompt and the tree
        # batch-invariant mode: every target pass is padded to the same number of rows (True: 128), so a
        # token's logits do not depend on how many rows its pass had, and ar, chain and tree give the same
        # tokens in bf16 too. It costs the padding rows' work (little where a step is launch-bound).
        if isinstance(batch_invariant, bool):
            self.rows = BATCH_INVARIANT_ROWS if batch_invariant else 0
        elif isinstance(batch_invariant, int) and batch_invariant >= 1:
            self.rows = batch_invariant
        else:
            raise ValueError(f"batch_invariant={batch_invariant!r} must be True/False or a row count >= 1")

    # ------------------------------------------------------------------ checks
    def _plan(self, prompt, method, max_new_tokens, shape):
        cfg = self.target.config
        if method not in METHODS:
            raise ValueError(f"method={method!r} is unknown; use one of {', '.join(METHODS)}")
        if method != "ar" and self.draft is None:
            raise ValueError(f"method={method!r} needs a draft model; load one (e.g. load_draft) or use method='ar'")
        max_new_tokens = _whole(max_new_tokens, "max_new_tokens", "tokens to generate")
        context = cfg.context_length
        total = prompt.numel() + max_new_tokens
        if total > context:
            raise ValueError(
                f"prompt ({prompt.numel()} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds the "
                f"model's context of {context}; shorten the prompt or ask for fewer tokens"
            )
        reserve = shape.num_nodes + shape.depth + 1 if shape is not None else 1
        if self.rows and (shape.num_nodes if shape is not None else 1) > self.rows:
            raise ValueError(
                f"tree_shape {list(shape.widths)} has {shape.num_nodes} nodes but batch-invariant passes have "
                f"{self.rows} rows; use a tree of at most {self.rows} nodes, or batch_invariant={shape.num_nodes}"
            )
        if shape is not None:
            check_tree_limits(shape)
            shape.check_fits(cfg.vocab_size)
            if shape.num_nodes >= context:
                raise ValueError(
                    f"tree_shape {list(shape.widths)} has {shape.num_nodes} nodes but the model's context is "
                    f"{context}; use a tree of far fewer nodes, e.g. {list(DEFAULT_TREE_SHAPE.widths)}"
                )
        need = total + reserve  # a full tree always fits after the last committed token
        if self.max_cache_len is not None and need > self.max_cache_len:
            raise ValueError(
                f"the cache holds {self.max_cache_len} slots but this call needs {need} (prompt {prompt.numel()} + "
                f"{max_new_tokens} new + {reserve} for the tree); use a smaller tree_shape, fewer tokens, or a "
                "larger max_cache_len"
            )
        return self.max_cache_len or need

    def _check_call(self, prompt_ids, method, max_new_tokens, tree_shape, gamma, verify, temperature, top_k, top_p,
                    do_sample):  # fmt: skip
        """Every check of a generate call, before any buffer is touched -> (prompt, shape, verify, params,
        cache slots needed)."""
        prompt = check_prompt(prompt_ids, self.target.config.vocab_size, self.target.device)
        shape = None
        if method == "tree":
            shape = TreeShape.of(tree_shape)
        elif method == "chain":
            gamma = _whole(gamma, "gamma", "draft tokens per step")
            if gamma > MAX_TREE_DEPTH:
                raise ValueError(
                    f"gamma={gamma} is above the cap of {MAX_TREE_DEPTH} draft tokens a step; use e.g. 4-8"
                )
            shape = TreeShape.chain(gamma)
        _warn_ignored(method, tree_shape, gamma, top_k, top_p, temperature, do_sample)
        verify = resolve_sampling(method, verify, do_sample, temperature)
        params = SamplingParams(temperature, top_k, top_p)
        check_verify(method, verify, params, shape or TreeShape.root_only())
        return prompt, shape, verify, params, self._plan(prompt, method, max_new_tokens, shape)

    def _sampler(self, verify, params, seed, generator):
        """(the level rule of the draft tree, the generator, its seed)."""
        dev = self.target.device
        if generator is None:
            if seed is None:  # drawn from torch's global RNG, so torch.manual_seed still fixes a run
                seed = int(torch.randint(0, 2**62, (1,)))
            if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
                raise ValueError(f"seed={seed!r} must be an integer in [0, 2**63)")
            generator = make_generator(seed, dev)
        elif torch.device(generator.device).type != torch.device(dev).type:
            raise ValueError(
                f"generator is on {generator.device} but the target is on {dev}; create it with "
                f"make_generator(seed, device='{dev}')"
            )
        grow = steps.beam_rule
        if verify in ("rrs", "chain"):
            grow = functools.partial(steps.sampled_rule, params=params, generator=generator)
        elif verify == "naive-topk":
            grow = functools.partial(steps.beam_rule, params=params)
        return grow, generator, seed

    def _cut(self, emitted: list[int], room: int, stop_at_eos: bool = True):
        """Respect max_new_tokens exactly and, with stop_at_eos, stop after the first EOS. Without it every accepted
        token is kept, EOS or not: the cache already holds them, and AR would emit them too."""
        emitted = emitted[:room]
        if not stop_at_eos:
            return emitted, False
        eos = set(self.target.config.eos_ids)
        for i, tok in enumerate(emitted):
            if tok in eos:
                return emitted[: i + 1], True
        return emitted, False

    def _text(self, tokens):
        return self.tokenizer.decode(tokens) if self.tokenizer is not None else None

    # ------------------------------------------------------------------ the loop
    @torch.inference_mode()
    def generate(
        self,
        prompt_ids,
        method: str = "tree",
        max_new_tokens: int = 64,
        tree_shape=DEFAULT_TREE_SHAPE,
        gamma: int = DEFAULT_GAMMA,
        trace: bool = False,
        stop_at_eos: bool = True,
        verify: str | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        do_sample: bool | None = None,
    ) -> GenerationResult:
        """Generate up to max_new_tokens after prompt_ids (token ids, batch 1).

        method "ar" | "chain" (gamma draft tokens) | "tree" (tree_shape, e.g. [4, 16, 16, 16, 16]);
        verify "greedy" (temperature 0) or a sampling rule of spec.verify.VERIFY_RULES; temperature /
        top_k / top_p / do_sample as in transformers' generate; seed or generator (on the target's
        device) fix a sampled run; trace=True records every step (tree, mask, accepted path)."""
        dev = self.target.device
        prompt, shape, verify, params, cache_len = self._check_call(
            prompt_ids, method, max_new_tokens, tree_shape, gamma, verify, temperature, top_k, top_p, do_sample
        )
        max_new_tokens = operator.index(max_new_tokens)  # checked above: a numpy or 0-d integer becomes an int
        grow, gen, seed = self._sampler(verify, params, seed, generator)
        sampling = verify != "greedy"
        pick = (lambda lg: sample_categorical(probs_from_logits(lg, params), gen)[None]) if sampling else None
        drafting = "sampled" if verify in ("rrs", "chain") else "beam"
        st = steps.DecodeState(
            self.target, self.draft, shape, cache_len, self.backend, verify != "greedy", drafting, self.rows
        )
        timer = StageTimer(dev)
        t0 = time.perf_counter()
        with timer.stage("prefill"):
            steps.prefill(st, prompt, pick)  # the first token is sampled too
        out, _ = self._cut(st.out[:1].tolist(), max_new_tokens)
        stopped = stop_at_eos and out[-1] in self.target.config.eos_ids
        res = GenerationResult(
            method, out, 1, [], {}, 0.0,
            tree_shape=list(shape.widths) if method == "tree" else None,
            gamma=gamma if method == "chain" else None,
            verify=verify, seed=seed if sampling else None, **params.as_dict(),
        )  # fmt: skip
        while len(out) < max_new_tokens and not stopped:
            prefix_len = int(st.P)
            if method == "ar":
                with timer.stage("verify"):
                    steps.ar_step(st, pick)
            else:
                with timer.stage("draft"):
                    steps.draft_root(st, grow)
                    for l in range(2, st.D + 1):
                        steps.draft_next(st, l, grow)
                res.draft_calls += st.D
                with timer.stage("verify"):
                    if sampling:
                        result, tree, preds = steps.sample_accept(st, steps.verify_forward(st), verify, params, gen)
                    else:
                        steps.verify(st)
                with timer.stage("commit"):
                    steps.commit(st)
            res.target_calls += 1
            n, *emitted = torch.cat([st.n_acc, st.emitted]).tolist()  # the one host sync per step
            new, stopped = self._cut(emitted[:n], max_new_tokens - len(out), stop_at_eos)
            out.extend(new)
            res.accepted_lengths.append(len(new))
            if trace and method != "ar":
                if not sampling:
                    tree, preds, result = steps.step_outcome(st)
                res.trace.append(
                    StepRecord(len(res.trace), prefix_len, tree.to("cpu"), preds.cpu(), result, new, self._text(out))
                )
        if shape is not None:
            res.add_acceptance(split_stats(st.stats.tolist(), st.D, st.R))
        res.new_tokens, res.stopped_at_eos = out, stopped
        res.stage_seconds = timer.as_dict()
        res.wall_seconds = time.perf_counter() - t0
        return res
