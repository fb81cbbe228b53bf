"""What a run leaves on disk, below the engine, valuation, methods and report: the run folder's
file names (`layout`, torch-free, so that `mmval report` reads runs without torch) and the typed
checkpoint with its safe save and load (`checkpoint`)."""
