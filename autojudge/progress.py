"""Progress bars for long work; quiet when AUTOJUDGE_QUIET is set (tests, JSON output)."""

from __future__ import annotations

import os

from tqdm.auto import tqdm


def progress(**kwargs) -> tqdm:
    kwargs.setdefault("disable", bool(os.environ.get("AUTOJUDGE_QUIET")))
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(**kwargs)
