"""``refstream console``: the operator's pages, a small aiohttp app of its own, off the
edge's hot path.

It reads what ``refstream status``, ``dead``, ``replay``, ``erase --status`` and the drop
stats already know, through the same code: ``access.py`` (who may see what), ``ring.py``
(the pipeline's last 15 minutes, sampled in this process), ``tail.py`` (the newest events,
read without joining a consumer group), ``actions.py`` (dead letters and replays),
``views.py`` (erasures and a tenant's links), ``app.py`` (routes, headers, static pages).
The pages are static HTML with one JavaScript module each (``static/``): no build chain.
"""
