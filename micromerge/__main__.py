"""`python -m micromerge …`: the `micromerge` command, for an environment whose scripts folder is
not on the PATH (a venv not activated, a notebook's `!python -m micromerge eval …`)."""

from micromerge.cli import main

main()
