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

from longspec_lab.decoding.eager import SpecDecoder  # noqa: E402
from longspec_lab.decoding.graphs import GraphDecoder  # noqa: E402
from longspec_lab.models.draft_io import load_draft, save_draft  # noqa: E402
from longspec_lab.models.glide import DraftConfig, Glide  # noqa: E402
from longspec_lab.models.loaders import load_target  # noqa: E402
from longspec_lab.models.pair import load_pair  # noqa: E402
from longspec_lab.models.target import Target  # noqa: E402
from longspec_lab.ops.sampling import SamplingParams  # noqa: E402
from longspec_lab.paths import load_prompts  # noqa: E402
from longspec_lab.spec.draft import grow_beam_tree, grow_sampled_tree  # noqa: E402
from longspec_lab.spec.trace import GenerationResult, StepRecord  # noqa: E402
from longspec_lab.spec.tree import DEFAULT_TREE_SHAPE, DraftTree, TreeShape  # noqa: E402
from longspec_lab.spec.verify import VERIFY_RULES, AcceptResult, accept_greedy  # noqa: E402

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
