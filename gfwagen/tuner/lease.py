"""Who may start a journal study afresh: file locks next to the study's journal.

A tune without --resume starts its study afresh by deleting the journal file. When another
tuner on this host is still running that study (a second `gfwagen tune` of the same shapes,
or the driver processes of --devices), deleting it would pull the file from under that
tuner: its later appends would land in the new file under its own trial ids and corrupt
both studies. So every driver holds a shared lock on `<journal>.users.flock` while it runs,
and a fresh start resets the journal only when it can take that lock exclusively (nobody is
running); otherwise it joins the running study, as the drivers of --devices do. The
decision and the preparation happen under a second, exclusive `<journal>.setup.flock`, so no
other driver can start or reset in between. flock locks are per host (local file system).
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


@contextlib.contextmanager
def journal_lease(journal: Path, want_fresh: bool,
                  prepare: Callable[[bool], T]) -> Iterator[T]:
    """Call prepare(fresh) under the setup lock, fresh = want_fresh and nobody else running
    the study; yield its result while holding the users lock (shared)."""
    journal.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{journal}.setup.flock", "a") as setup, open(f"{journal}.users.flock", "a") as users:
        fcntl.flock(setup, fcntl.LOCK_EX)
        try:
            fresh = want_fresh and _try_exclusive(users)
            result = prepare(fresh)
            # EX -> SH is not atomic in flock, but any other driver needs the setup lock
            # (held here) before it can decide anything, so nobody gets in between
            fcntl.flock(users, fcntl.LOCK_SH)
        finally:
            fcntl.flock(setup, fcntl.LOCK_UN)
        yield result


def _try_exclusive(f) -> bool:
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
