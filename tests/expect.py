"""``TestCase`` with ``assertExpectedInline``: expecttest's where it is installed, else a stand-in.

The GPU image has no expecttest; without this, every test module that pins text with it failed at
import there and its GPU tests never ran. The stand-in compares exactly as expecttest does without
``EXPECTTEST_ACCEPT`` (expected text first, the same message); rewriting the expected text in the
source needs the real package, so the stand-in refuses ``EXPECTTEST_ACCEPT=1`` rather than pass.
"""

from __future__ import annotations

import os
import unittest

__all__ = ["TestCase"]

try:
    from expecttest import TestCase
except ModuleNotFoundError:

    class TestCase(unittest.TestCase):  # type: ignore[no-redef]
        longMessage = True

        def assertExpectedInline(self, actual: str, expect: str, skip: int = 0) -> None:
            if os.getenv("EXPECTTEST_ACCEPT"):
                raise RuntimeError("EXPECTTEST_ACCEPT=1 rewrites the expected text, which needs "
                                   "expecttest: pip install expecttest")
            self.assertMultiLineEqual(expect, actual, msg="To accept the new output, re-run test "
                                      "with envvar EXPECTTEST_ACCEPT=1 (needs expecttest)")
