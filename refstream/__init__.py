"""refstream: the command line and the embedded development servers."""
