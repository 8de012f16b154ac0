"""Alerts: the pure rule engine (``engine``) and the stage that runs it on its own thread (``stage``)."""
