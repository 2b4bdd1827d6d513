"""The generative test's parts (tests/faults/test_generative.py), one job per module:
``schedule.py`` (the seeded schedule), ``ops.py`` (the client operations and their answer
shapes), ``client.py`` (clients that retry as real ones do), ``faults.py`` (the nemesis),
``cluster.py`` (a seed's servers, links and processes), ``history.py`` (what was sent, what
came back, what broke when), ``checker.py`` (the checker over the whole history) and
``run.py`` (one seed from start to end)."""
