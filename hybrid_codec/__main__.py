"""`python -m hybrid_codec ...` is the `hybrid-codec` command: what torchrun starts, one per rank."""

from .cli import main

main()
