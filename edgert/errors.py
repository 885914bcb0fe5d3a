"""Errors edgert raises for bad input; the CLI prints their message without a traceback."""


def brief(exc: BaseException, limit: int = 200) -> str:
    """The first line of a library's exception message, shortened: for wrapping it into a one-line error."""
    lines = str(exc).strip().splitlines()
    text = next((line.strip() for line in lines if line.strip()), type(exc).__name__)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class EdgertError(Exception):
    """Base class of every error caused by the user's input rather than by a bug."""


class ModelFileError(EdgertError):
    """A model file is missing, truncated, garbled or of an unsupported kind."""


class UnsupportedModelError(EdgertError):
    """A model uses an architecture, tensor type or tokenizer edgert cannot handle."""


class TargetError(EdgertError):
    """A target name is unknown, or an artifact was built for another target."""


class ArtifactError(EdgertError):
    """An artifact is corrupt, of another format version, or does not match this runtime."""


class ContextLengthError(EdgertError):
    """A prompt (plus the tokens asked for) does not fit into the model's context."""


class OutputPathError(EdgertError):
    """An output path cannot be written (missing folder, not writable)."""


class NoDeviceError(EdgertError):
    """An accelerator a model needs (an OpenCL GPU) is not present on this machine."""


class DeviceError(EdgertError):
    """A device cannot be reached, its link broke or garbled a frame, or its agent refused a request."""
