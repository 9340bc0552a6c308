"""The one exception type genkit shows to people.

A GenkitError carries a message that already says what went wrong, where, and what to do.
The CLI prints it as a single line on stderr and exits with `exit_code`; library users can
catch it like any exception.
"""

from __future__ import annotations


class GenkitError(Exception):
    """An error caused by the user's input or environment, worth one clear line."""

    exit_code = 1

    def __init__(self, message: str, *, exit_code: int | None = None):
        super().__init__(message)
        self.message = message
        if exit_code is not None:
            self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message


def did_you_mean(word: str, choices) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def shorten(text: str, limit: int = 80) -> str:
    """User data inside a message, bounded: a huge value must not become a huge line."""
    return text if len(text) <= limit else f"{text[:limit - 25]}... ({len(text)} characters)"


def shown(value) -> str:
    """repr() of user data, bounded (see `shorten`)."""
    try:
        text = repr(value)
    except Exception:  # a value so deep that repr() itself fails
        text = f"<{type(value).__name__}>"
    return shorten(text)
