"""The cyclic garbage collector, tuned once per process after startup (the edge's and the
worker's): what startup built is moved out of the collector's sight, and the youngest
generation is collected after ``young`` new containers rather than after 700.

What startup built (the modules, the routes, the settings, the worker's geo tables and UA
regexes: ~10^5 container objects that live as long as the process) is frozen: every full
collection walked all of it. A full collection follows when enough objects that survived
two young ones have died since (a quarter of the old generation), and at a few thousand
requests a second the objects of the requests in flight were promoted every few
milliseconds: the edge spent 15 % of its samples in ``gc_collect_main`` (py-spy --native
under ``refstream bench --only cap``'s full load), the worker a quarter of its CPU before
its own tuning. Cycles are still collected: only less often, and without walking what
never dies."""

from __future__ import annotations

import functools
import gc


def settle(young: int) -> None:
    """Collect what startup left, freeze the rest, and collect the youngest generation after
    ``young`` (at least 700, the default) net new containers."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(max(700, young), older, oldest)


# once per process and size: an app started again in one process (the tests') freezes nothing new
settle_once = functools.cache(settle)
