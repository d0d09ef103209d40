"""The code that runs inside every dtool process: import-light and fail-open.

=================  =====================================================================
``activation``     the entry point dtoolcore loads; importing it installs the wrapper
``host``           the wrapper around ``DataSet.item_content_abspath``: cache-path
                   prediction, hit/miss detection, single-flight fetches, fail-open
``hookspecs``      the two pluggy hook specifications
``plugins``        discovery of hook implementations through entry points; dispatch
``tracking``       our own hook implementations: take the hold, journal the access
=================  =====================================================================

This package imports nothing itself, so that loading ``activation`` costs only what the
wrapper needs; ``plugins`` never imports ``host`` (pluggy's eggsample: the host owns the
plugin manager).  A fault here is logged and the user's access proceeds.
"""
