"""Not collected by the suite (its name is no test_*.py): tests/test_install.py runs it
with the embedded packages hidden, to see the suite's one line about the missing extra."""

from typing import Any


def test_services(services: Any) -> None:
    pass


def test_private_redis(private_redis: Any) -> None:
    pass
