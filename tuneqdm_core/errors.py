"""Every error the pack raises on purpose, under one base class; each message names what is wrong.

Where a class takes the place of a builtin that callers catch (ValueError for a bad value, KeyError,
TypeError, RuntimeError, FileNotFoundError), it also derives from that builtin, so `except ValueError`
still catches what it caught before.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .train import TrainResult


class TuneQDMError(Exception):
    """Base class: every error this package raises on purpose."""


class SettingError(TuneQDMError, ValueError):
    """An option or argument outside what the library accepts: bits, group size, experts, s_in init,
    backend, routing boundaries, training steps and batch sizes, file names, command-line flags."""


class UnsupportedError(TuneQDMError, ValueError):
    """A well-formed input this pack cannot handle: an adapter on a grouped convolution, string padding,
    a weight patch that needs the float weight, nvfp4 weights."""


class UnsupportedDtypeError(UnsupportedError, TypeError):
    """A tensor dtype a kernel does not take."""


class ShapeError(TuneQDMError, ValueError):
    """A tensor's shape does not fit the one it is combined with (activation features against the
    weight, packed codes against the weight shape)."""


class FileFormatError(TuneQDMError):
    """The file is missing, truncated, corrupted, not safetensors, or not one of ours."""


class FileMissingError(FileFormatError, FileNotFoundError):
    """A file or folder the caller named does not exist."""


class ModelMismatchError(TuneQDMError, ValueError):
    """A file, a set of scales or a quantized weight does not fit the model or layer it is applied to."""


class MissingScalesError(ModelMismatchError, KeyError):
    """The active scale set has no entry for a layer that runs."""


class NotQuantizedError(ModelMismatchError, TypeError):
    """A model that has no TuneQDM-quantized layers was given where a quantized one is needed."""


class AlreadyQuantizedError(ModelMismatchError):
    """A model that is already TuneQDM-quantized was given to be quantized again."""


class RoutingError(TuneQDMError, ValueError, RuntimeError):
    """A multi-expert layer cannot choose its expert: no router, no timestep, or experts that do not fit
    the batch or the model."""


class TrainingDataError(TuneQDMError, ValueError):
    """Training images, latents, captions or conditionings are missing, empty, malformed or do not pair up."""


class BackendUnavailableError(TuneQDMError, RuntimeError):
    """The Triton backend was asked for but cannot be imported here."""


class InPlaceInputError(TuneQDMError, RuntimeError):
    """A checkpointed block changed one of its input tensors in place: its recompute would start from the
    changed values and the gradients would be wrong, so the step stops instead."""


class NonFiniteLossError(TuneQDMError):
    """Training produced a NaN/inf loss; `result` holds the last finite scales (no step taken on it)."""

    def __init__(self, message: str, result: TrainResult) -> None:
        super().__init__(message)
        self.result = result


class CollectiveError(TuneQDMError, RuntimeError):
    """An error every rank of a data-parallel run raises at the same point (a peer failed, ranks disagree):
    no rank has to be told."""


class PeerFailedError(CollectiveError):
    """Another rank failed; the message names it and its error."""
