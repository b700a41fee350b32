"""Error types the CLI reports as one line (kept here, free of heavy imports, so catching them costs nothing), and
how a SIGTERM ends a run."""

import contextlib
import signal
import threading


class ModelLoadError(RuntimeError):
    """A model folder or URI that cannot be loaded as a Qwen2.5-VL checkpoint."""


class DemoError(RuntimeError):
    """The local pipeline run or the demo's model server did not do what the demo needs."""


class CurationError(RuntimeError):
    """A curation run that cannot go on (a worker process died, the output overlaps an input, ...)."""


class ClusterError(RuntimeError):
    """A cluster object (TrainJob, InferenceService, pipeline run) that failed, timed out or could not be made."""


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def sigterm_exits():
    """Within the block, SIGTERM (a cancelled pipeline step, ``kill``) raises SystemExit like Ctrl-C raises
    KeyboardInterrupt, so ``finally`` clean-ups run; the previous handler comes back after it. Signals reach only
    the main thread: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
