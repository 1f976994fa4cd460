"""The one exception type minilora raises for bad input.

Everything that reads files, configs or requests from a user raises `MiniloraError` (or a
subclass) with a one-line message naming the problem and the fix, so callers and CLIs can
catch exactly our errors and print them without a traceback.
"""


class MiniloraError(ValueError):
    """Bad input: a file, a config value or a request that minilora refuses, with the reason."""
