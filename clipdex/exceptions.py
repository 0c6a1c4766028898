"""The few error types clipdex raises; each message names the culprit (file, value) and the fix."""


class ClipdexError(Exception):
    """Base class: the CLI prints these as a one-line error and exits 1."""


class ModelSpecError(ClipdexError, ValueError):
    """A model spec the user typed matches none of the accepted forms."""


class CheckpointError(ClipdexError):
    """A checkpoint file is missing, truncated, corrupt or does not fit the architecture."""


class ManifestError(ClipdexError):
    """A manifest is missing, unreadable or lacks a required column."""


class MissingDependencyError(ClipdexError, ImportError):
    """An optional dependency is needed for what was asked; the message says what to install."""


class StoreError(ClipdexError):
    """A database folder or collection is missing, unreadable or not a clipdex store."""


class ModelMismatchError(StoreError):
    """A query or an append used another encoder than the one that filled the collection."""


class CorruptStoreError(StoreError):
    """Stored data cannot be read or is impossible (a vector that is not unit-norm, a checksum that differs)."""


class RuntimeChoiceError(ClipdexError):
    """The inference runtime asked for (``--runtime onnx``) cannot run this model faithfully."""
