"""`python -m mmval` runs the CLI (torchrun needs a module to start)."""

from cli.main import app

app()
