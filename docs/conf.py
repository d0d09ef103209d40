"""Sphinx configuration for dtool-cache-manager."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "dtool-cache-manager"
author = "dtool-cache-manager developers"
from dtool_cache_manager import __version__ as release  # noqa: E402

version = release
extensions = ["sphinx.ext.autodoc"]
autodoc_member_order = "bysource"
exclude_patterns = ["_build"]
html_theme = "alabaster"
