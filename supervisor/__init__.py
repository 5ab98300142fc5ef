"""The stoker daemon: configuration, the event loop, worker pool policy, and the CLI."""

__version__ = "0.1.0"
