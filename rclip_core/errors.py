"""User-facing errors.

Anything a user can cause (a missing file, a malformed annotation, a wrong checkpoint, an unknown recipe key) raises
:class:`RclipError` with a one-line message that names the culprit. The command line turns it into ``Error: ...`` and
a non-zero exit, without a traceback; programming errors keep their tracebacks.
"""

from __future__ import annotations


class RclipError(Exception):
    """A problem with the user's input, stated in one line that names the culprit."""
