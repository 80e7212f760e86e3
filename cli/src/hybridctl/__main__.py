"""`hybridctl` — the operator's command line."""

from __future__ import annotations

from hybridctl.app import app


def main() -> None:
    app()


if __name__ == "__main__":
    main()
