"""Errors every room may raise and every door may answer the same way.

``NotFound``: what a request names does not exist (in the caller's workspace); a route
answers 404, the command line says so. The management API raises it, and so does the
erasure room below it, so one ``except`` catches both.
"""

from __future__ import annotations


class NotFound(LookupError):
    pass
