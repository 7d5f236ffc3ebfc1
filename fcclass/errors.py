"""Errors a user can fix: the CLI prints their message and exits 1, without a traceback."""


class FcclassError(Exception):
    """A mistake in the user's input (config, data, paths, checkpoints) with a message saying how to fix it."""


class ConfigError(FcclassError):
    """The config file or a --set override is invalid."""


class DataError(FcclassError):
    """The dataset is missing, unreadable or inconsistent with the config."""


class ModelError(FcclassError):
    """The layer list cannot be built (unknown layer, shapes that don't fit)."""


class CheckpointError(FcclassError):
    """A run directory or checkpoint is missing, corrupt or unsafe."""


class NotAnImageError(DataError):
    """A file that is not an image Pillow can read (another format, corrupt header, empty): the server's 415."""
