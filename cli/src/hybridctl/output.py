"""Where the CLI writes: rich consoles, JSON output and the error helper every command uses."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.console import Console

console = Console()
err = Console(stderr=True, soft_wrap=True)  # error lines stay whole: scripts and tests grep them


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``message`` on stderr and return the exit to raise (2 = bad arguments, 1 = the system failed)."""
    err.print(f"[red]error:[/red] {message}", highlight=False, markup=True)
    return typer.Exit(code)


def print_json(data: Any) -> None:
    # Plain print, not rich: the output must parse as JSON whatever the terminal width.
    typer.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def bounded(low: float | None = None, high: float | None = None) -> Any:
    """A typer callback checking a numeric option's range with an error that names the value given.

    typer's own ``min=``/``max=`` answer "Input should be greater than or equal to 0" without the value the operator
    typed; in a script that passes ``--epoch $E`` that value is the whole clue.
    """

    def check(value: float | None) -> float | None:
        if value is None:
            return value
        if low is not None and value < low:
            raise typer.BadParameter(f"{value!r} is below the minimum {low:g}")
        if high is not None and value > high:
            raise typer.BadParameter(f"{value!r} is above the maximum {high:g}")
        return value

    return check
