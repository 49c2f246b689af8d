"""Every weight problem is a ``WeightsError``: one ``except vgg_flax.WeightsError`` catches them.

Each subclass also derives from the builtin its callers already catch: a bad file, bad mapping or
bad checkpoint is a ``ValueError`` (the input is wrong), weights that no source has are an
``OSError`` (the environment lacks them), a missing checkpoint directory a ``FileNotFoundError``.
Every message is one line naming the problem and the fix.

    WeightsError
    ├── WeightFileError          (ValueError)  a torch/safetensors file cannot be used
    ├── WeightMismatchError      (ValueError)  weights do not fit the VGG they are for
    ├── CheckpointError          (ValueError)  a directory is not a readable vgg_flax checkpoint
    │   └── NotACheckpoint       (+ FileNotFoundError)  no such directory, no vgg_flax.json
    ├── ConversionError          (ValueError)  bad input to the converter (its CLIs exit 2)
    └── WeightsUnavailableError  (OSError)     no source has published weights (offline)
"""


class WeightsError(Exception):
    """Base of every weight problem of vgg_flax; the message is one line with the fix."""


class WeightFileError(WeightsError, ValueError):
    """A weights file cannot be used; the message is one line naming the problem and the fix."""


class WeightMismatchError(WeightsError, ValueError):
    """Weights do not fit the VGG they were given for; the message lists every problem."""


class CheckpointError(WeightsError, ValueError):
    """A directory that is not a readable vgg_flax checkpoint; the message is one line naming
    the file, the problem and the fix."""


class NotACheckpoint(CheckpointError, FileNotFoundError):
    """No checkpoint directory or no ``vgg_flax.json``: also a FileNotFoundError, which is what
    callers of a file reader expect to catch."""


class ConversionError(WeightsError, ValueError):
    """Bad input to a conversion (exit code 2); the message is one line with the fix."""


class WeightsUnavailableError(WeightsError, OSError):
    """No source had the weights (offline, nothing cached); the message names every place
    looked and the converter command to run where there is network."""
