"""The Procfile is the process model everything runs: honcho locally, and containers
through ``python -m cli.procfile <type>`` (the image's entrypoint), so the
commands live in one place.

Running a type replaces this process with ``/bin/sh -c '<line>'``; every line starts
with ``exec``, so the shell in turn becomes gunicorn/celery/flower and receives the
container's signals directly.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PROCFILE = Path(__file__).resolve().parent.parent / "Procfile"


def procfile_lines(path: Path = PROCFILE) -> dict[str, str]:
    """The Procfile's process types and their commands, in file order."""
    lines: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        if raw.strip() and not raw.lstrip().startswith("#"):
            name, _, command = raw.partition(":")
            lines[name.strip()] = command.strip()
    return lines


def main(argv: list[str]) -> int:
    lines = procfile_lines()
    if len(argv) != 1 or argv[0] not in lines:
        print(f"usage: python -m cli.procfile {{{','.join(lines)}}}", file=sys.stderr)
        return 2
    os.chdir(PROCFILE.parent)
    os.execv("/bin/sh", ["/bin/sh", "-c", lines[argv[0]]])  # noqa: S606 - the Procfile is ours
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
