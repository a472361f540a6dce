"""The generation loops: autoregressive, chain and tree speculative decoding (greedy).

Every loop is the same pipeline of short stages (LongSpec, arXiv 2502.17421; shared/LONGSPEC.md §1):

    prefill -> [ draft (beam tree) -> verify (one target pass) -> accept -> commit ] * steps

State between steps: the target's cache holds every committed token except the newest one, the
*root*: the target's own last prediction. The draft's ring buffer lags further behind: it still has
to ingest the tokens emitted last step (`draft_pending`). A chain of gamma is the tree of widths
[1] * gamma, so chain and tree share one code path. This module holds no maths of its own: the tree
comes from `tree.py`, acceptance from `verify.py`, attention from `attention.py`.

Sampling (temperature > 0, `verify=`; shared/LONGSPEC.md §4): the target's tokens come from
`sampling.probs_from_logits` (temperature, top-k, top-p as transformers applies them) with an explicit
seeded torch.Generator. Drafting depends on the rule: "target-sample" verifies the usual beam tree,
"rrs" / "chain" a tree / chain SAMPLED from the draft (`sample_tree.py`, q recorded per node), and the
biased counter-example "naive-topk" the beam tree with q recorded. "greedy" at temperature > 0 is an error.
"""

from __future__ import annotations

import functools
import time

import torch

from longspec_lab.decoding.timing import StageTimer
from longspec_lab.ops.attention import check_backend, default_backend
from longspec_lab.ops.sampling import SamplingParams, make_generator, probs_from_logits, sample_categorical
from longspec_lab.spec.draft import grow_beam_tree, grow_beam_tree_q, grow_sampled_tree
from longspec_lab.spec.trace import GenerationResult, StepRecord
from longspec_lab.spec.tree import DEFAULT_TREE_SHAPE, DraftTree, TreeShape
from longspec_lab.spec.verify import LOSSLESS_SAMPLING_RULES, VERIFY_RULES, accept_greedy, acceptance_counts

METHODS = ("ar", "chain", "tree")


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


def _as_prompt(prompt_ids, device) -> torch.Tensor:
    ids = torch.as_tensor(prompt_ids, dtype=torch.long)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"prompt_ids must be a 1-D list of token ids (batch 1), got shape {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise ValueError("the prompt is empty; give at least one token (e.g. the BOS token or some text)")
    return ids.to(device)


class SpecDecoder:
    """Greedy decoding of one sequence with a target, and optionally a GliDe draft.

    `generate` validates everything before it touches a cache, and rebuilds its caches on each call,
    so a call that raised leaves the decoder usable."""

    def __init__(
        self, target, draft=None, backend: str | None = None, tokenizer=None, max_cache_len: int | None = None
    ):
        self.target, self.draft, self.tokenizer = target, draft, tokenizer
        self.backend = check_backend(backend or default_backend(target.device))
        self.max_cache_len = max_cache_len  # None: sized per call from the prompt and the tree

    # ------------------------------------------------------------------ checks
    def _plan(self, prompt, method, max_new_tokens, shape):
        cfg = self.target.config
        if method not in METHODS:
            raise ValueError(f"method={method!r} is unknown; use one of {', '.join(METHODS)}")
        if method != "ar" and self.draft is None:
            raise ValueError(f"method={method!r} needs a draft model; load one (e.g. load_draft) or use method='ar'")
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
        total = prompt.numel() + max_new_tokens
        if total > cfg.max_position_embeddings:
            raise ValueError(
                f"prompt ({prompt.numel()} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds the "
                f"model's context of {cfg.max_position_embeddings}; shorten the prompt or ask for fewer tokens"
            )
        reserve = shape.num_nodes if shape is not None else 1
        need = total + reserve  # a full tree always fits after the last committed token
        if self.max_cache_len is not None and need > self.max_cache_len:
            raise ValueError(
                f"the cache holds {self.max_cache_len} slots but this call needs {need} (prompt {prompt.numel()} + "
                f"{max_new_tokens} new + {reserve} for the tree); use a smaller tree_shape, fewer tokens, or a "
                "larger max_cache_len"
            )
        if shape is not None:
            shape.check_fits(cfg.vocab_size)
        return self.max_cache_len or need

    # ------------------------------------------------------------------ stages
    def _prefill(self, prompt, cache_len, timer, pick=None):
        t = self.target
        with timer.stage("prefill"):
            tcache = t.new_cache(cache_len)
            logits = t(prompt[None], cache=tcache, start=0, backend=self.backend, last_only=True)
            tcache.length = prompt.numel()
            dcache = None
            if self.draft is not None:
                dcache = self.draft.new_cache(batch=1, max_tree_nodes=self._max_nodes)
                self.draft.ingest(prompt[None], dcache, tcache, backend=self.backend, logits=False)
        return tcache, dcache, (pick(logits[0, -1]) if pick else int(logits[0, -1].argmax()))

    def _draft_tree(self, root, draft_pending, shape, tcache, dcache, grow=None):
        d = self.draft
        dev = self.target.device
        P = tcache.length
        logits = d.ingest(torch.tensor([draft_pending], device=dev), dcache, tcache, backend=self.backend)
        root_lp = torch.log_softmax(logits[0, -1:].float(), dim=-1)  # [1, V]

        def level_logprobs(partial: DraftTree, node_ids: torch.Tensor) -> torch.Tensor:
            if node_ids.numel() == 1 and int(node_ids[0]) == 0:
                return root_lp
            mask = partial.mask[node_ids][:, 1:]  # [n, N-1] ancestors; scratch slots hold nodes 1..N-1
            lg = d.tree_forward(
                partial.tokens[node_ids][None],
                node_ids - 1,
                P + partial.depths[node_ids],
                mask,
                dcache,
                tcache,
                backend=self.backend,
            )
            return torch.log_softmax(lg[0].float(), dim=-1)

        return (grow or grow_beam_tree)(root, shape, level_logprobs, device=dev)

    def _verify(self, tree: DraftTree, tcache) -> torch.Tensor:
        P = tcache.length
        logits = self.target(
            tree.tokens[None], positions=tree.positions(P), cache=tcache, start=P, mask=tree.mask, backend=self.backend
        )
        return logits[0].argmax(-1)  # [N] the target's next token after each node's path

    def _target_probs(self, tree: DraftTree, tcache, params: SamplingParams) -> torch.Tensor:
        P = tcache.length
        logits = self.target(
            tree.tokens[None], positions=tree.positions(P), cache=tcache, start=P, mask=tree.mask, backend=self.backend
        )
        return probs_from_logits(logits[0], params)  # [N, V] the target's sampling distribution per node

    def _sampler(self, verify, params, seed, generator):
        """(drafting function or None for the beam tree, the generator, its seed)."""
        dev = self.target.device
        if generator is None:
            if seed is None:  # drawn from torch's global RNG, so torch.manual_seed still fixes a run
                seed = int(torch.randint(0, 2**62, (1,)))
            generator = make_generator(seed, dev)
        elif torch.device(generator.device).type != torch.device(dev).type:
            raise ValueError(
                f"generator is on {generator.device} but the target is on {dev}; create it with "
                f"make_generator(seed, device='{dev}')"
            )
        grow = None
        if verify in ("rrs", "chain"):
            grow = functools.partial(grow_sampled_tree, params=params, generator=generator)
        elif verify == "naive-topk":
            grow = functools.partial(grow_beam_tree_q, params=params)
        return grow, generator, seed

    @staticmethod
    def _commit(tcache, path: torch.Tensor) -> None:
        # accepted nodes sit at slots P + node_id; move them (root first) to P, P+1, ...
        P = tcache.length
        tcache.commit(P + path, P)

    def _cut(self, emitted: list[int], room: int):
        """Respect max_new_tokens exactly and stop after the first EOS."""
        emitted = emitted[:room]
        eos = set(self.target.config.eos_ids)
        for i, tok in enumerate(emitted):
            if tok in eos:
                return emitted[: i + 1], True
        return emitted, False

    def _text(self, tokens):
        return self.tokenizer.decode(tokens) if self.tokenizer is not None else None

    # ------------------------------------------------------------------ loops
    @torch.inference_mode()
    def generate(
        self,
        prompt_ids,
        method: str = "tree",
        max_new_tokens: int = 64,
        tree_shape=DEFAULT_TREE_SHAPE,
        gamma: int = 4,
        trace: bool = False,
        stop_at_eos: bool = True,
        verify: str = "greedy",
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> GenerationResult:
        """verify: "greedy" (temperature 0) or a sampling rule of verify.VERIFY_RULES; temperature /
        top_k / top_p as transformers' warpers; seed or generator (on the target's device) fix the run."""
        dev = self.target.device
        prompt = _as_prompt(prompt_ids, dev)
        shape = None
        if method == "tree":
            shape = TreeShape.of(tree_shape)
        elif method == "chain":
            shape = TreeShape.chain(gamma)
        params = SamplingParams(temperature, top_k, top_p)
        check_verify(method, verify, params, shape or TreeShape.root_only())
        cache_len = self._plan(prompt, method, max_new_tokens, shape)
        grow, gen, seed = self._sampler(verify, params, seed, generator)
        sampling = verify != "greedy"
        pick = (lambda lg: int(sample_categorical(probs_from_logits(lg, params), gen))) if sampling else None
        self._max_nodes = shape.num_draft_nodes if shape is not None else 1
        timer = StageTimer(dev)
        t0 = time.perf_counter()
        tcache, dcache, root = self._prefill(prompt, cache_len, timer, pick)
        out, _ = self._cut([root], max_new_tokens)
        stopped = stop_at_eos and out[-1] in self.target.config.eos_ids
        res = GenerationResult(
            method,
            out,
            1,
            [],
            {},
            0.0,
            tree_shape=list(shape.widths) if method == "tree" else None,
            gamma=gamma if method == "chain" else None,
            verify=verify,
            seed=seed if sampling else None,
            **params.as_dict(),
        )
        draft_pending = [root]
        while len(out) < max_new_tokens and not stopped:
            room = max_new_tokens - len(out)
            if method == "ar":
                with timer.stage("verify"):
                    P = tcache.length
                    logits = self.target(
                        torch.tensor([[root]], device=dev), cache=tcache, start=P, backend=self.backend
                    )
                    tcache.length = P + 1
                    new = [pick(logits[0, -1]) if pick else int(logits[0, -1].argmax())]
                res.target_calls += 1
            else:
                with timer.stage("draft"):
                    tree = self._draft_tree(root, draft_pending, shape, tcache, dcache, grow)
                    tree, q = tree if isinstance(tree, tuple) else (tree, None)  # q: sampled / naive-topk
                res.draft_calls += shape.depth
                with timer.stage("verify"):
                    if sampling:
                        p = self._target_probs(tree, tcache, params)
                        result = VERIFY_RULES[verify](tree, p, q, gen)
                        preds = p.argmax(-1)  # the target's likeliest token per node (for traces)
                    else:
                        preds = self._verify(tree, tcache)
                        result = accept_greedy(tree, preds)
                res.target_calls += 1
                res.add_acceptance(acceptance_counts(tree, result))
                new = result.emitted.tolist()
            new, hit_eos = self._cut(new, room)
            if method != "ar":
                with timer.stage("commit"):  # keep only what is emitted: root + accepted nodes before a cut
                    self._commit(tcache, result.path[: len(new)])
            stopped = stop_at_eos and hit_eos
            out.extend(new)
            res.accepted_lengths.append(len(new))
            root = new[-1]
            draft_pending = new
            if trace and method != "ar":
                res.trace.append(
                    StepRecord(
                        len(res.trace),
                        tcache.length - len(new),
                        tree.to("cpu"),
                        preds.cpu(),
                        result,
                        new,
                        self._text(out),
                    )
                )
        res.new_tokens, res.stopped_at_eos = out, stopped
        res.stage_seconds = timer.as_dict()
        res.wall_seconds = time.perf_counter() - t0
        return res
