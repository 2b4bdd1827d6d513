"""The fault suite: real processes, broken on purpose, then the invariants (Jepsen's method).

Each scenario runs `refstream migrate`, `workspace create`, `link create`, `serve` and
`work` as the README does, against a Postgres and a Redis of the suite's own (never the
machine's), sends steady HTTP load where every request carries a unique marker, injects one
fault, waits for the drain (a condition, not a sleep) and checks ``_checks.py``'s invariants:
I1 everything answered 2xx is stored exactly once, I2 every counter equals its event rows,
I3 nothing pending and only planted poison dead-lettered. It prints one figure line
(accepted, stored, dead-lettered, duplicates, seconds to recover after the fault ended),
also shown in the terminal summary, and fails listing every violation.

    .venv/bin/python -m pytest tests/faults        # short (REFSTREAM_FAULTS=short, the default)
    scripts/faults                                 # full durations (REFSTREAM_FAULTS=full)
    REFSTREAM_FAULTS_KEEP=1 ...                    # keep each scenario's process logs

Layout: ``_servers.py`` (the breakable servers), ``_stage.py`` (a scenario's processes and
its end), ``_load.py`` (the load and its record), ``_checks.py`` (the invariants),
``_plan.py`` (durations per mode); ``test_*.py`` one scenario each, marker ``faults``.
"""
