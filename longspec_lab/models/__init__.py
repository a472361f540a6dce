"""Models: the compact target (`Target`) with its static KV cache, the GliDe draft, and the loaders."""
