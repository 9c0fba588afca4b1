"""The one exception type the CLI turns into a one-line message and exit code 2 (house rule 10),
and the hint such messages give for a misspelt name."""
import difflib
from typing import Iterable


class UserError(ValueError):
    """A user's mistake: the message names the key, file or value and what to do."""


def did_you_mean(word, choices: Iterable[str]) -> str:
    """' (did you mean X?)' for the choice closest to a misspelt `word`, or '' when none is close."""
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean {close[0]}?)" if close else ""
