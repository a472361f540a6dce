"""One palette for every figure: a colour per node status, per decoding method, per verification
rule and per step stage, so that `tree` is the same green in notebook 1 and notebook 7.

Figures never pick a colour by position in a list; they ask `method_color(name)`,
`rule_color(name)` or `stage_color(name)`, which read the tables below. `SERIES_COLORS` is only for
series that are none of these (window sizes, training curves, batch rows).

Taught in: notebooks/01_speculative_decoding_in_one_picture.ipynb
"""

from __future__ import annotations

COLORS = {  # fill colours by node status
    "root": "#ffd966",
    "accepted": "#7fc97f",
    "verified": "#fdc086",
    "rejected": "#f4cccc",
    "drafted": "#cfe2f3",
    "more": "#ffffff",
    "lost": "#e6e6e6",  # a beam candidate that lost the competition for its level
}


STATUS_TEXT = {
    "root": "root (last token)",
    "accepted": "accepted path",
    "verified": "verified, but an ancestor was rejected",
    "rejected": "rejected",
    "drafted": "drafted (not verified here)",
    "more": "collapsed siblings",
    "lost": "candidate that lost the beam (not drafted)",
}


PATH_EDGE = "#1b7837"

# decoding methods and attention backends: ours in blues/greens, transformers in oranges
METHOD = {
    "ar": "#4c72b0",  # plain autoregressive decoding (ours)
    "chain": "#8172b3",  # chain speculation (gamma drafted tokens in a row)
    "tree": "#2ca02c",  # LongSpec tree speculation
    "tree-sdpa": "#98df8a",  # the same tree with the SDPA attention backend
    "hf-greedy": "#dd8452",  # transformers generate
    "hf-prompt-lookup": "#c44e52",  # transformers prompt-lookup decoding
    "triton": "#2ca02c",  # our Triton tree-attention kernel
    "sdpa": "#98df8a",  # SDPA with a dense mask
    "two-pass": "#17becf",  # flash prefix + masked tree + LSE merge
    "flex": "#937860",  # FlexAttention
    "hf": "#dd8452",  # transformers (eager)
}

# verification rules (spec/verify.py); the biased counter-example in red
RULE = {
    "greedy": "#4c72b0",
    "target-sample": "#17becf",
    "rrs": "#2ca02c",
    "chain": "#8172b3",
    "naive-topk": "#d62728",
}

# the stages of one step
STAGE = {
    "prefill": "#bcbd22",
    "draft": "#8172b3",
    "verify": "#4c72b0",
    "commit": "#2ca02c",
    "other": "#bbbbbb",
}

# figure-neutral marks: floors, reference lines, exact distributions
REFERENCE = "#333333"

# series that are neither a method nor a rule nor a stage
SERIES_COLORS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#17becf", "#bcbd22"]
METHOD_COLORS = SERIES_COLORS  # the old name, kept for callers outside teach/


def method_key(name: str) -> str:
    """A method label as figures write it ('chain (γ = 4)', 'tree-4-16-16-sdpa', 'hf-prompt-lookup',
    'transformers generate', 'triton_tree', ...) -> its key in METHOD."""
    s = str(name).strip().lower().replace("_", "-")
    if "prompt" in s and "lookup" in s:
        return "hf-prompt-lookup"
    if s.startswith("hf") or s.startswith("transformers"):
        return "hf-greedy" if s not in ("hf",) else "hf"
    if s == "ar" or s.startswith("ar ") or s.startswith("ar(") or "autoregressive" in s:
        return "ar"
    if s.startswith("chain"):
        return "chain"
    if s.startswith("tree"):
        return "tree-sdpa" if "sdpa" in s else "tree"
    if s.startswith("triton"):
        return "triton"
    if s.startswith("sdpa"):
        return "sdpa"
    if s.startswith("two-pass") or s.startswith("two pass"):
        return "two-pass"
    if s.startswith("flex"):
        return "flex"
    raise ValueError(
        f"no palette colour for method {name!r}; name it ar / chain... / tree... / hf-... (or add it to palette.METHOD)"
    )


def method_color(name: str) -> str:
    return METHOD[method_key(name)]


def rule_color(name: str) -> str:
    key = str(name).strip().lower()
    if key not in RULE:
        raise ValueError(f"no palette colour for verification rule {name!r}; pick one of {sorted(RULE)}")
    return RULE[key]


def stage_color(name: str) -> str:
    key = str(name).strip().lower()
    if key not in STAGE:
        raise ValueError(f"no palette colour for stage {name!r}; pick one of {sorted(STAGE)}")
    return STAGE[key]


def series_color(k: int) -> str:
    return SERIES_COLORS[k % len(SERIES_COLORS)]


def _html(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
