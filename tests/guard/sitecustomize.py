"""Loaded by every Python process a test starts (tests/conftest.py puts this folder on PYTHONPATH):
under a test without the ``slow`` marker, compiling a real model fails instead of taking minutes.

The guard is installed when the process imports `edgert.families.compile`, and not before: a
process that never compiles (a device-side run) imports nothing more than it would without it.
"""

import os
import sys

if os.environ.get("EDGERT_TEST_UNMARKED"):
    import importlib.abc
    import importlib.util

    class _InstallAfterImport(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name != "edgert.families.compile":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            exec_module = spec.loader.exec_module

            def exec_and_guard(module):
                exec_module(module)
                import real_model_guard

                real_model_guard.install(os.environ["EDGERT_TEST_UNMARKED"])

            spec.loader.exec_module = exec_and_guard
            return spec

    sys.meta_path.insert(0, _InstallAfterImport())
