"""The client library version."""

__version__ = "0.1.0"
