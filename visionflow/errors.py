"""User-facing errors: the CLI prints them as one line and exits non-zero, no traceback."""


class VisionflowError(Exception):
    """Base class for errors caused by user input (bad data, config, checkpoint, device)."""


class DatasetError(VisionflowError):
    """A dataset spec, folder, archive or download is not what was expected."""


class ConfigError(VisionflowError):
    """A configuration value is invalid."""


class CheckpointError(VisionflowError):
    """A checkpoint or export file cannot be loaded safely."""


class DeviceError(VisionflowError):
    """The requested device is not available."""
