"""The one error type users see: a bad input, config, file or model, reported in one line.

Every module raises a subclass of `Error` for problems the user can fix; the CLI prints
`bpnet <command>: error: <message>` and exits with status 2, without a traceback. The
subclasses only say which stage failed; code that handles errors catches `Error`.
"""


class Error(Exception):
  """A user-facing failure: the message names the file, key or value and what was expected."""


class ConfigError(Error, ValueError):
  """A config key with an unknown name, a wrong type or an impossible value."""


class SkeletonError(Error, ValueError):
  """A pose config (skeleton JSON) that cannot be used."""


class DataError(Error, ValueError):
  """A dataset spec, annotation file, record or image that cannot be used."""


class CheckpointError(Error):
  """A checkpoint or model directory that is missing, unreadable or does not fit the model."""


class TrainingError(Error, RuntimeError):
  """Training cannot go on (non-finite loss, unusable data)."""


class InferenceError(Error, ValueError):
  """A model or input that inference cannot use."""


class PruneError(Error, ValueError):
  """Pruning options or inputs that cannot be used."""


class ExportError(Error, ValueError):
  """An export that cannot be done or fails its check."""


class WeightsImportError(Error, ValueError):
  """A weights file to import (ImageNet VGG19) that cannot be read or is not the network named."""
