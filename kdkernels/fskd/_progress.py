"""A progress bar over batches: tqdm when installed, else a few plain lines on stderr."""
from __future__ import annotations

import sys
from typing import Iterable, Iterator, Optional


def progress(iterable: Iterable, *, total: Optional[int] = None, desc: str = "",
             enabled: bool = True) -> Iterable:
    """Wrap ``iterable`` in a progress display (or return it unchanged when disabled)."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _plain(iterable, total, desc)
    return tqdm(iterable, total=total, desc=desc, unit="batch", leave=False)


def _plain(iterable: Iterable, total: Optional[int], desc: str) -> Iterator:
    """Print ``desc: i/total batches`` about ten times, and once at the end."""
    step = max(1, (total or 10) // 10)
    i = 0
    for i, item in enumerate(iterable, 1):
        yield item
        if i % step == 0 or i == total:
            print(f"{desc}: {i}/{total if total is not None else '?'} batches", file=sys.stderr, flush=True)
    if i % step and i != total:
        print(f"{desc}: {i} batches", file=sys.stderr, flush=True)
