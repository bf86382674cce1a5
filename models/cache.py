"""Where built-in models (the tiny checkpoints) are written, and how a folder there is made once.

Several Ray actors may ask for the same tiny checkpoint at the same moment; each folder is written
into a temporary sibling and renamed into place, so none of them ever reads a half-written one.
One helper for the three builders (tiny PixelRefer, tiny SAM 2, tiny SAM 3).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_root() -> Path:
    """`PIXELREFER_CACHE`, else `~/.cache/pixelrefer-pipeline`."""
    env = os.environ.get("PIXELREFER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pixelrefer-pipeline"


def write_once(folder: Path, fill: Callable[[Path], None], marker: str) -> Path:
    """`folder`, filled by `fill(tmp)` on first use. `marker` is a file `fill` writes: the folder
    only ever appears whole (renamed into place), so its presence says the folder is ready. A
    process that loses the race to rename keeps the winner's folder (the same definition writes
    the same files)."""
    if (folder / marker).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        fill(tmp)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process won the race
            if not (folder / marker).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
