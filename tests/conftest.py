import os

# The Triton kernels run in Triton's CPU interpreter in these tests: set it before any test module imports
# the kernel module, so that no module has to be reloaded (a reload would register the custom op twice).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def embedded_pair():
    """The shipped target + draft + tokenizer, in float32 on the CPU."""
    from longspec_lab.models.pair import load_pair

    return load_pair(device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def embedded_target():
    """The shipped target + tokenizer (no draft), in float32 on the CPU."""
    from longspec_lab.models.pair import load_pair

    target, _, tok = load_pair(device="cpu", dtype="float32", need_draft=False)
    return target, tok


@pytest.fixture(scope="session")
def hf_embedded():
    from transformers import AutoModelForCausalLM

    from longspec_lab.paths import EMBEDDED_TARGET

    return AutoModelForCausalLM.from_pretrained(str(EMBEDDED_TARGET), dtype=torch.float32).eval()
