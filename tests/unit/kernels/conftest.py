"""What the kernel tests share: a whole greedy decode with one of the package's switches off and then on."""

import pytest

COUNTS = ("depth_tried", "depth_accepted", "rank_tried", "rank_accepted")


@pytest.fixture
def decodes_the_same(embedded_pair, monkeypatch):
    """check(module, name, text, **generate_kwargs): decode `text` greedily with SpecDecoder on the embedded pair
    (float32, CPU) as plain decoding, then with `module.name` set to "off" and to "on" (20 new tokens unless
    max_new_tokens is given), and assert what a kernel behind a switch must keep: plain greedy's tokens, and the
    definition's accepted lengths and acceptance counts."""
    from longspec_lab.decoding.eager import SpecDecoder

    target, drafter, tok = embedded_pair
    dec = SpecDecoder(target, drafter, backend="torch")

    def check(module, name, text, max_new_tokens=20, **kwargs):
        ids = tok.encode(text)
        ar = dec.generate(ids, method="ar", max_new_tokens=max_new_tokens, stop_at_eos=False)
        runs = {}
        for value in ("off", "on"):
            monkeypatch.setattr(module, name, value)
            runs[value] = dec.generate(ids, max_new_tokens=max_new_tokens, stop_at_eos=False, **kwargs)
        assert runs["on"].new_tokens == ar.new_tokens == runs["off"].new_tokens
        assert runs["on"].accepted_lengths == runs["off"].accepted_lengths
        for counts in COUNTS:
            assert getattr(runs["on"], counts) == getattr(runs["off"], counts), counts

    return check
