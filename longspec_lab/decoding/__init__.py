"""The loops: the eager decoder runs the stage functions; the graph decoder captures the same ones."""
