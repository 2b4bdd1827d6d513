"""refstream: the command line and the embedded development servers."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("refstream")
except PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "0+unknown"
