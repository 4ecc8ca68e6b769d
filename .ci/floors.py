"""Print pip constraints pinning every runtime dependency to its declared floor.

Reads ``[project].dependencies`` of pyproject.toml, and the extras of :data:`EXTRAS`
(which the ``test`` extra installs too), so the floors are written down once:
``redis>=5.3`` becomes ``redis==5.3``. A dependency without a ``>=`` floor is an error,
since CI could not test the oldest release it lets users install.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

#: Extras whose floors are tested as well.
EXTRAS = ("metrics",)
#: name, optional [extras], the ``>=`` floor; other clauses (``,<4``, markers) may follow.
FLOOR = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._\-]*)\s*(?:\[[^\]]*\])?\s*>=\s*([^,;\s]+)")


def floors(pyproject: Path) -> list[str]:
    """``name==floor`` for each runtime dependency of ``pyproject``, and of :data:`EXTRAS`."""
    project = tomllib.loads(pyproject.read_text())["project"]
    extras = project.get("optional-dependencies", {})
    dependencies = [*project["dependencies"], *(d for e in EXTRAS for d in extras.get(e, []))]
    pins = []
    for requirement in dependencies:
        match = FLOOR.match(requirement)
        if match is None:
            raise SystemExit(f"{requirement!r} declares no >= floor")
        pins.append(f"{match[1]}=={match[2]}")
    return pins


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent.parent)
    print("\n".join(floors(root / "pyproject.toml")))
