"""Error types the CLI reports as one line (kept here, free of heavy imports, so catching them costs nothing)."""


class ModelLoadError(RuntimeError):
    """A model folder or URI that cannot be loaded as a Qwen2.5-VL checkpoint."""


class DemoError(RuntimeError):
    """The local pipeline run or the demo's model server did not do what the demo needs."""


class CurationError(RuntimeError):
    """A curation run that cannot go on (a worker process died, the output overlaps an input, ...)."""


class ClusterError(RuntimeError):
    """A cluster object (TrainJob, InferenceService, pipeline run) that failed, timed out or could not be made."""
