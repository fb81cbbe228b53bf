"""Errors that are the user's to fix: the CLI prints them as one paragraph and exits 2."""


class UserError(Exception):
    """A mistake in what the user asked for (bad recipe, missing file, wrong checkpoint)."""
