"""Packaging metadata lives in pyproject.toml.

This file adds the one thing pyproject.toml cannot declare: a ``.pth`` file at the top of
site-packages.  dtool-cli 0.7.1 imports ``pkg_resources`` as the very first thing the
``dtool`` command does, and setuptools 80.9 or later then prints a ``UserWarning`` on every
``dtool`` command, before any code of this package can run (README, "The pkg_resources
warning").  Python runs a ``.pth`` file's ``import`` line at start-up: in a process whose
program is ``dtool`` it adds a filter that ignores exactly that warning (its message, its
category, raised from ``dtool_cli.cli``), after any ``-W``/``PYTHONWARNINGS`` filter the user
gave.  In any other program it only compares ``sys.argv[0]``, and it imports nothing.
Editable installs do not get the file.
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "dtool_cache_manager-pkg_resources_warning.pth"
PTH_TEXT = (
    "# dtool-cache-manager: in `dtool`, ignore dtool-cli 0.7.1's pkg_resources UserWarning\n"
    "import os, sys; os.path.basename((getattr(sys, 'argv', None) or [''])[0]) == 'dtool' "
    "and __import__('warnings').filterwarnings('ignore', "
    "message='pkg_resources is deprecated as an API', category=UserWarning, "
    r"module=r'dtool_cli\.cli$', append=True)"
    "\n"
)


class BuildPyWithPth(build_py):
    """``build_py`` that also writes ``PTH_NAME`` at the top of the wheel."""

    def run(self):
        super().run()
        self.mkpath(self.build_lib)
        with open(os.path.join(self.build_lib, PTH_NAME), "w", encoding="utf-8") as f:
            f.write(PTH_TEXT)

    def get_outputs(self, include_bytecode=1):
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PTH_NAME)]


setup(cmdclass={"build_py": BuildPyWithPth})
