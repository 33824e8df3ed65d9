"""nilmd: real-time non-intrusive load monitoring daemon."""

__version__ = "0.1.0"
