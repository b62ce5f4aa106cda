"""`python -m eiup.cli` (also what `accelerate launch -m eiup.cli bench ...` runs)."""

from . import main

main()
