"""What every ``fhir-bridge`` command shares: exit codes, one-line errors, settings loading, the progress bar.

Kept apart from the commands so that each command group is a module importing only this one, and the root
group (:mod:`fhir_bridge.cli`) joins them without any of them importing it back.

Exit codes, the same for every command:
0 success; 3 done but something was left out (``pull``: listed in problems.json); 2 bad input (a malformed
identifier, an unknown patient, a URL that is not a FHIR source, bad options); 1 any other failure (the
source failing or breaking the protocol, an unexpected error); 130 interrupted. Errors are one line on
stderr, never a traceback (set ``FHIR_BRIDGE_DEBUG=1`` to see one).
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from fhir_bridge.errors import (
    AmbiguousPatient,
    BridgeError,
    InvalidInput,
    NotAFhirSource,
    NotFound,
)

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_PARTIAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
F = TypeVar("F", bound=Callable[..., Any])


def exit_code_for(error: BaseException) -> int:
    """The one mapping from the error tree to exit codes."""
    if isinstance(error, InvalidInput | NotFound | NotAFhirSource | AmbiguousPatient):
        return EXIT_BAD_INPUT
    return EXIT_FAILURE


def fail(message: str, code: int) -> None:
    click.echo(f"fhir-bridge: error: {message}", err=True)
    sys.exit(code)


def one_line_errors(func: F) -> F:
    """Turn every error into one line on stderr and its exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except BridgeError as exc:
            if os.environ.get("FHIR_BRIDGE_DEBUG"):
                raise
            fail(str(exc), exit_code_for(exc))
        except KeyboardInterrupt:
            fail("interrupted", EXIT_INTERRUPTED)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as exc:
            if os.environ.get("FHIR_BRIDGE_DEBUG"):
                raise
            fail(f"unexpected {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", EXIT_FAILURE)
        return None

    return wrapper  # type: ignore[return-value]


def cli_settings(**overrides: Any) -> Any:
    """The bridge's settings with these overrides, logging configured at their level."""
    from fhir_bridge.adapters.settings import load_settings
    from fhir_bridge.logs import configure_logging

    settings = load_settings(**overrides)
    configure_logging(settings.log_level)
    return settings


class ProgressBar:
    """A rich progress bar on stderr when it is a terminal; silent otherwise."""

    def __enter__(self) -> Callable[[str, int, int], None]:
        self._bar: Any = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 console=Console(stderr=True), transient=True)
            self._bar.start()
            self._tasks: dict[str, Any] = {}
        return self.update

    def update(self, stage: str, done: int, total: int) -> None:
        if self._bar is None:
            return
        if stage not in self._tasks:
            self._tasks[stage] = self._bar.add_task(stage, total=total or 1)
        self._bar.update(self._tasks[stage], completed=done, total=total or 1)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
