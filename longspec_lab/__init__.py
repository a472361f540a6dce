"""longspec_lab: learn, measure and use long-context tree speculative decoding (LongSpec, arXiv 2502.17421).

The public API, in the order data flows through a step (shape -> draft -> verify -> commit -> trace):

    from longspec_lab import load_pair, SpecDecoder
    target, draft, tok = load_pair()                       # the embedded pair, or your own folders
    res = SpecDecoder(target, draft, tokenizer=tok).generate(tok.encode(text), max_new_tokens=128)

Everything listed in `__all__` is stable; the subpackages (ops, models, spec, decoding, teach,
bench, train) hold the rest. docs/LONGSPEC.md explains the algorithm.

Taught in: notebooks/01_speculative_decoding_in_one_picture.ipynb.
"""

__version__ = "0.2.0"

# Lazy: `import longspec_lab` (and so `longspec-lab --help`) does not pay for torch until a name is used.
_WHERE = {
    "SpecDecoder": "longspec_lab.decoding.eager",
    "GraphDecoder": "longspec_lab.decoding.graphs",
    "load_draft": "longspec_lab.models.draft_io",
    "save_draft": "longspec_lab.models.draft_io",
    "DraftConfig": "longspec_lab.models.glide",
    "Glide": "longspec_lab.models.glide",
    "load_target": "longspec_lab.models.loaders",
    "load_pair": "longspec_lab.models.pair",
    "Target": "longspec_lab.models.target",
    "SamplingParams": "longspec_lab.ops.sampling",
    "load_prompts": "longspec_lab.paths",
    "grow_beam_tree": "longspec_lab.spec.draft",
    "grow_sampled_tree": "longspec_lab.spec.draft",
    "GenerationResult": "longspec_lab.spec.trace",
    "StepRecord": "longspec_lab.spec.trace",
    "DEFAULT_TREE_SHAPE": "longspec_lab.spec.tree",
    "DraftTree": "longspec_lab.spec.tree",
    "TreeShape": "longspec_lab.spec.tree",
    "VERIFY_RULES": "longspec_lab.spec.verify",
    "AcceptResult": "longspec_lab.spec.verify",
    "accept_greedy": "longspec_lab.spec.verify",
}


def __getattr__(name: str):
    if name in _WHERE:
        import importlib

        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'longspec_lab' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_WHERE))


__all__ = [
    "__version__",
    # shape
    "TreeShape",
    "DEFAULT_TREE_SHAPE",
    # models
    "load_pair",
    "load_target",
    "load_draft",
    "save_draft",
    "Target",
    "Glide",
    "DraftConfig",
    # draft -> verify
    "DraftTree",
    "grow_beam_tree",
    "grow_sampled_tree",
    "accept_greedy",
    "AcceptResult",
    "VERIFY_RULES",
    "SamplingParams",
    # the loops and what they return
    "SpecDecoder",
    "GraphDecoder",
    "GenerationResult",
    "StepRecord",
    # data
    "load_prompts",
]
