"""The stages of tree speculative decoding (LongSpec, arXiv 2502.17421): shape, draft, verify, commit, trace."""
