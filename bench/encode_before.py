""":mod:`bench.encode_app` on the ``quart_wslb`` package found in ``BENCH_PACKAGE_DIR``
(an export of an earlier commit, made by :mod:`bench.encode`), imported before anything
else imports the package of this checkout."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.environ["BENCH_PACKAGE_DIR"])

from bench.encode_app import app  # noqa: E402

__all__ = ("app",)
