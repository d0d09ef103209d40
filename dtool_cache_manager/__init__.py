"""dtool-cache-manager: usage tracking, in-use holds and safe cleaning for the dtool cache."""

__version__ = "0.1.0"
