"""vkconv's version, here (not in ``vkconv/__init__``) so that the runtime can name it without
importing the whole package; the packaging reads it from this file."""

__version__ = "0.1.0"
