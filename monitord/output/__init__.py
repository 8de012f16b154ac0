"""Output: the one stage that owns side effects.

- ``stage``: the thread: event log first, then ZeroMQ, sinks, clips, dashboard feed;
- ``eventlog``: the JSONL log (rotation, seq, reading by seq); ``publish``: log + PUB socket + replay;
- ``clips``, ``metrics``, ``dashboard`` (+ ``static/``).
"""
