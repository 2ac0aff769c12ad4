"""Errors the library raises on bad input; each message names what is wrong."""


class TuneQDMError(Exception):
    """Base class: every error this package raises on purpose."""


class FileFormatError(TuneQDMError):
    """The file is missing, truncated, corrupted, not safetensors, or not one of ours."""


class ModelMismatchError(TuneQDMError):
    """A file or a set of scales does not fit the quantized model it is applied to."""


class RoutingError(TuneQDMError):
    """A multi-expert layer ran without a timestep to choose its expert by."""
