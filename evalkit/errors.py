"""The one exception type that the CLI turns into a one-line message and exit status 2."""


class EvalkitError(Exception):
    """An expected failure caused by input (a file, a value, a name): the message names the value and the fix."""

    exit_code = 2
