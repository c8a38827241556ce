"""`python -m micromerge.cli …`, as `accelerate launch -m micromerge.cli …` runs every process."""

from micromerge.cli import main

main()
