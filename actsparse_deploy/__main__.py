"""`python -m actsparse_deploy` runs the `actsparse` command line."""

from .cli import main

main()
