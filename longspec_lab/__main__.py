"""`python -m longspec_lab ...` is the `longspec-lab` command (see longspec_lab.cli).

Taught in: notebooks/01_speculative_decoding_in_one_picture.ipynb
"""

from longspec_lab.cli import main

raise SystemExit(main())
