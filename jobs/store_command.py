"""The shared shell of the commands that act on OUTPUT's tables (`embed`, `maintain`, `migrate`):
parse `--storage-options`, run the work, turn its `OutputError` or ^C into one line on stderr and
an exit code. Each command keeps only its own work and its own words."""

from __future__ import annotations

import sys
from typing import Any, Callable

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def run_on_output(storage_options_text: str | None, work: Callable[[dict[str, Any]], int | None],
                  interrupted: str, usage_errors: tuple[type[BaseException], ...] = ()) -> int:
    """`work(storage_options)` -> exit code (None: 0). Credentials never reach the printed errors."""
    from pipeline.config import IndexConfig
    from pipeline.storage_errors import redact
    from pipeline.store import OutputError

    try:
        storage_options = IndexConfig.parse_storage_options(storage_options_text)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        code = work(storage_options)
    except usage_errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OutputError as exc:
        print(f"error: {redact(str(exc), storage_options)}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"interrupted: {interrupted}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK if code is None else code
