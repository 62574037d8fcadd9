"""One exception type for every error a user can cause: the CLI prints it as one line."""


class CodecError(Exception):
    """A bad input, file or setting, with a message that says what is wrong and where."""
