"""User-facing errors.

Every error a user can cause (a missing dataset, a wrong folder layout, an unknown model name,
a checkpoint that does not fit) raises a subclass of :class:`MicronetError` whose message is one
sentence naming the problem and the fix. The command line prints that sentence and exits with
status 2; library users can catch the base class.
"""


class MicronetError(Exception):
    """Base class of the errors a user can fix by changing their input."""


class DatasetError(MicronetError):
    """A dataset is missing, laid out wrongly or holds values we refuse to read."""


class ModelConfigError(MicronetError):
    """An unknown model name or a channel config that does not fit the architecture."""


class CheckpointError(MicronetError):
    """A checkpoint directory is missing, truncated, of another model, or not in micronet's format."""


class ConfigError(MicronetError):
    """A training or command-line option has an impossible value."""


class QuantizationError(MicronetError):
    """An impossible quantization setting, or a quantization step used out of order."""


class PruningError(MicronetError):
    """An impossible pruning setting, a model pruning cannot analyse, or a channel record that does not fit."""


class DeployError(MicronetError):
    """A model that cannot be exported, an artifact that is not what it claims, or a missing runtime."""


class PipelineError(MicronetError):
    """A pipeline config that is malformed or names what does not exist, or a step whose input is missing."""


class NumericalError(MicronetError):
    """Training diverged (a NaN or infinite loss), or a model's outputs are not finite numbers."""


class OutputError(MicronetError):
    """An output path that holds what micronet may not replace, or that cannot be created or written."""
