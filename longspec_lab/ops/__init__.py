"""Leaf operations with no state: hybrid tree attention and the sampling warpers."""
