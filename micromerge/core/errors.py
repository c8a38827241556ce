"""One exception type for every problem the user can fix.

The CLI turns it into a one-line message and exit code 2, so no stage ever needs to
know about click or print tracebacks for bad input.
"""


class MicromergeError(Exception):
    """A user-fixable problem: the message names the file, key or value and the fix."""

    exit_code = 2


class FolderInUse(MicromergeError):
    """Another process is writing into the output folder now. The folder is that process's: a
    refused run leaves it as it is, even one it made itself a moment before the other took it."""


def first_line(error: BaseException) -> str:
    """A library's error as the reason in one of our lines: its message's first line (pyarrow's
    run on with context), or its type's name when it has no message."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
