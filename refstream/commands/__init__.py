"""The commands of ``refstream``, one module per command or family of them; ``refstream.cli``
gathers them into one group. Each runs through ``refstream.runner`` and prints through
``refstream.output``, and none imports another."""
