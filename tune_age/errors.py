"""Errors that the CLI turns into one-line messages with a non-zero exit.

Library code raises a subclass of TuneAgeError whenever the user can fix the
problem (a bad path, key, value or file); anything else is a bug and keeps its
traceback.
"""


class TuneAgeError(Exception):
    """A problem with the user's input, reported as one line."""


class ConfigError(TuneAgeError):
    """A configuration key or value that is not valid."""


class DataError(TuneAgeError):
    """Data that cannot be read or labelled."""


class SpaceError(ConfigError):
    """A search-space file that is not valid."""


class ArtifactError(TuneAgeError):
    """A checkpoint or export that is missing, tampered with or not ours."""
