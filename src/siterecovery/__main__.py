"""`python -m siterecovery` is the CLI."""

from .cli import main

main()
