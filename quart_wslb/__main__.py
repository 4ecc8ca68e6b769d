"""``python -m quart_wslb``: the ``wslb`` command line (:mod:`quart_wslb.cli`)."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    main()
