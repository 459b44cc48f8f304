"""The error a user fixes by changing a setting: its message names the key or flag to change.

Every package raises it for configurations that cannot work; the command-line tools print its
message as one line (no traceback) and exit with status 2.
"""


class ConfigError(ValueError):
  """A configuration value, flag or input that cannot work; the message names it."""
