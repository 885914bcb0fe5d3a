"""Loaded by every Python process a test starts (tests/conftest.py puts this folder on PYTHONPATH):
under a test without the ``slow`` marker, compiling a real model fails instead of taking minutes."""

import os

if os.environ.get("EDGERT_TEST_UNMARKED"):
    import real_model_guard

    real_model_guard.install(os.environ["EDGERT_TEST_UNMARKED"])
