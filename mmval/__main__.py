"""`python -m mmval` runs the CLI (torchrun needs a module to start)."""

from mmval.cli.main import app

app()
