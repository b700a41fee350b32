"""Every error the library raises on purpose derives from :class:`DeepMedixError`; the CLI prints those as one line
(the message names the file, record, field or option) and exits 2, and lets anything else — a bug — raise with its
traceback. Kept free of heavy imports, so that catching them costs nothing. Also: how a SIGTERM ends a run."""

import contextlib
import signal
import threading


class DeepMedixError(Exception):
    """The base of every DeepMedix error type."""


class InputError(DeepMedixError, ValueError):
    """Input that cannot be used: a file, record, field, option or setting (a ``ValueError``, as before)."""


class MissingInputError(DeepMedixError, FileNotFoundError):
    """A file or folder the run needs is not there."""


class MissingToolError(DeepMedixError, RuntimeError):
    """A program or package the run needs is not installed (Java for METEOR, the openai client, ...)."""


class ModelLoadError(DeepMedixError, RuntimeError):
    """A model folder or URI that cannot be loaded as a Qwen2.5-VL checkpoint."""


class DemoError(DeepMedixError, RuntimeError):
    """The local pipeline run or the demo's model server did not do what the demo needs."""


class CurationError(DeepMedixError, RuntimeError):
    """A curation run that cannot go on (a worker process died, the output overlaps an input, ...)."""


class ClusterError(DeepMedixError, RuntimeError):
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
