"""Windowing + gate: one stage per source, from its ring buffer to the window queue.

- ``gate``: cleaning, levels, onset, speech share per VAD; the pure gate decision;
- ``tiling``: where windows start (live and offline alike) and cutting a window with every model's verdict;
- ``stage``: the thread that reads a source's ring and hands every window on.
"""
