"""monitord: a real-time audio monitoring daemon."""

__version__ = "0.1.0"
