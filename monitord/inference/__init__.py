"""Inference: windows in, scores out.

- ``queue``: the bounded window queue in front of it (live sources drop their own oldest windows, files wait);
- ``worker``: the stage's thread and the scorer it runs (batching, cascades, split-and-retry, CPU fallback);
- ``models``: the model contract and every kind of model (CLAP, speech emotion, YAMNet, anomaly).
"""
