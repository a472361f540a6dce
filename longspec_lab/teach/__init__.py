"""Teaching helpers: figures of trees, masks and results, widgets, notebook setup, the exact toy LM."""
