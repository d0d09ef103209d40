"""The package's own exceptions: one base class, so callers can catch everything we raise
on purpose, and nothing here is a click exception (the CLI turns them into messages)."""


class CacheManagerError(Exception):
    """Base of the errors dtool-cache-manager raises on purpose."""


class InvalidInput(CacheManagerError, ValueError):
    """A value the caller gave cannot be used (a sort key, a dataset with nothing cached);
    the command line shows it as one ``Error:`` line with exit status 2."""


class UnsafeCache(CacheManagerError):
    """Part of the cache cannot be trusted for this work (see ``docs/security.rst``); the
    message is one line that says how to fix it."""


class IncompleteItemError(CacheManagerError, OSError):
    """A fetched item does not have the size its manifest gives, even after a second fetch.
    An ``OSError``, like the brokers' own errors of a download."""
