"""Media extraction for `mmval prep`: raw clips to frames, spectrograms and optical flow."""


class ExtractionError(Exception):
    """A broken or unusable media file; the message is the reason recorded for the clip."""
