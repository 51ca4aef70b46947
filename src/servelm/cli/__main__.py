"""``python -m servelm.cli``: the same command line as ``servelm``."""

from servelm.cli import main

main()
