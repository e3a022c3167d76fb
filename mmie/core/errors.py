"""Exception types shared by every stage.

The CLI maps :class:`MmieError` (and ``ValueError`` raised by config validation) to a one-line
message and exit code 1; anything else is a bug and keeps its traceback under ``-v``.
"""


class MmieError(Exception):
    """A runtime failure the user can act on (bad file, wrong artifact, missing package)."""


class DataError(MmieError):
    """Input text is missing, malformed or empty (after filtering)."""


class ArtifactError(MmieError):
    """An artifact is missing, corrupt, of the wrong kind or made for another model."""


class ModelError(MmieError):
    """A model cannot be loaded or its layout is not understood."""


class MetricError(MmieError):
    """A metric cannot be computed from the inputs it was given."""


class CorruptFileError(ArtifactError, ValueError):
    """A file's bytes cannot be parsed (a truncated or damaged safetensors header).

    Also a ``ValueError``, so a reader that treats an unreadable cache file as a miss keeps
    doing so; the CLI maps it, like every :class:`MmieError`, to exit 1.
    """
