"""The Redis fleet (``generation.backend = "redis"``): front ends and ``parley worker``.

- ``jobs.py``: the wire format of the job queue and reply streams (both sides);
- ``remote.py``: :class:`RedisGenerator`, the front end's client;
- ``worker.py``: ``parley worker``, which serves queued jobs with a local generator;
- ``replies.py``: how a worker writes its replies, batched; ``worker_scripts.py``: its
  Lua scripts.
"""
