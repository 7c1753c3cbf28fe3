"""The base of the errors a user can act on (a bad config key, a damaged dataset file, ...).

``uda-ray`` prints these as one line naming the key or file, without a traceback, and exits
with status 2. A leaf module: it imports nothing from uda_ray, so every module can use it.
"""


class UserError(Exception):
    """Bad input a user can fix; the message names the file or key and what was expected."""


def did_you_mean(word: str, options) -> str:
    """``"; did you mean 'x'?"`` for the options closest to ``word`` (difflib), '' if none is close."""
    import difflib

    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
