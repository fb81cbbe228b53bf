"""The training engine: `session.py` builds what a run needs, `loop.py` trains it (`fit`) and
sends events to callbacks, `callbacks.py` and `tensorboard.py` are the callbacks that write the
run folder. It names no method and imports no valuation code; `mmval.runner` puts a run
together."""
