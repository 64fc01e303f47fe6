"""The one error type of the API: a bad option or a call that cannot go ahead.

Its message is one line that says what to do, in the caller's terms.
"""


class ConfigError(ValueError):
    """A bad option: the message is one line that says what to do."""
