"""The base of the errors a user can act on (a bad config key, a damaged dataset file, ...).

``uda-ray`` prints these as one line naming the key or file, without a traceback, and exits
with status 2. A leaf module: it imports nothing from uda_ray, so every module can use it.
"""


class UserError(Exception):
    """Bad input a user can fix; the message names the file or key and what was expected."""
