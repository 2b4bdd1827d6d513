"""The arq host: the worker process (``worker.py``) that runs the consumer, the archiver's
store for the erasure sweep, the replay job and the chores, on an arq pool whose keys keep
under the stream prefix (``arq_redis.py``). On top of ``workers/``: nothing there imports it."""
