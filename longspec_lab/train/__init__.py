"""Training: the code corpus, the tokenizer, the target and the GliDe draft."""
