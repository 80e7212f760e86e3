"""`python -m sim <world> ...` — start one piece of the simulated world.

Each world lives in its own subpackage exposing ``cli.main(argv)``; imports are lazy so that
starting one simulator does not import the others.
"""

from __future__ import annotations

import importlib
import sys

WORLDS = {
    "vast": "sim.vast.cli",
    "dapi": "sim.network.cli",
    "mlnode": "sim.mlnode.cli",
    "upstream": "sim.upstream.cli",
    "comfyui": "sim.comfyui.cli",
}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help"} or args[0] not in WORLDS:
        names = "|".join(WORLDS)
        print(f"usage: python -m sim {{{names}}} [options]", file=sys.stderr)
        return 0 if args and args[0] in {"-h", "--help"} else 2
    module = importlib.import_module(WORLDS[args[0]])
    return int(module.main(args[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
