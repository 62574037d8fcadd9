"""One exception type for every error a user can cause: the CLI prints it as one line."""


class CodecError(Exception):
    """A bad input, file or setting, with a message that says what is wrong and where."""


def first_line(exc: BaseException) -> str:
    """What a library's exception says, in one line: its first line of text, or its type's name."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
