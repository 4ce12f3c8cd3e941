"""The errors a user fixes by changing what they asked for: a config problem (the message names
the key), a store problem (the message names the file) and an analysis that cannot be done as
asked. Every layer raises these; the CLI prints them without a traceback."""


class ConfigError(ValueError):
    """A config problem the user must fix; the message names the key."""


class StoreError(ConfigError):
    """A study or tracking store that cannot be used as it is (damaged, missing, or not the
    study's); the message names the file and says what to do. Nothing is deleted for the user."""


class AnalysisError(ValueError):
    """The study cannot be analysed as asked (unknown study, no finished runs, unknown metric)."""
