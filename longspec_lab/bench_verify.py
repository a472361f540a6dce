"""`python -m longspec_lab.bench_verify`: the 8B-shaped decode, verify and draft step costs, the spelling
the project's measurement notes use. It runs `longspec_lab.bench.verify_cost` (same flags, same JSON):
a Llama-3-8B-shaped target with random weights, one decode step and one 72-row verification pass per
context, ours with each attention backend against stock transformers, and the bandwidth floors.

Taught in: notebooks/04_hybrid_tree_attention_and_the_triton_kernel.ipynb
"""

from longspec_lab.bench.verify_cost import main

if __name__ == "__main__":
    raise SystemExit(main())
