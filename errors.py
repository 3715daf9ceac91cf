"""The one root of the errors a user can cause (a flag, a file, a data set, a model directory).

Every module raises its own subclass (data_util.dataset.DataError, data_util.images.PrepareError,
data_util.geometry.GeometryError, data_util.flow_store.FlowStoreError, network.export.ExportError,
runs.DamagedCheckpoint) or UserError itself; the scripts' entry point (cli.run) turns exactly
these into one line ``error: ...`` and exit status 2. Anything else is a programming error and
shows its traceback.
"""


class UserError(Exception):
    """A problem with the user's input; its message is reported as one line."""


class ConfigError(UserError, ValueError):
    """Settings that cannot build or run a network (an unknown option, an image size the network's
    strides do not divide, a teacher that does not fit, ...): a ValueError of the library as well."""
