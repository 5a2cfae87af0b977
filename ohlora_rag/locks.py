"""Cross-process locks around publishing an index or a model folder, and which leftovers are safe to remove.

Outputs are written into a staging folder named after the writing process and swapped in by renames; two commands
that publish into the same place at once take turns on a lock file beside it. A staging folder belongs to its
writer while that process lives: cleanup removes only those whose owner is gone or that have not changed for a day.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OhloraError

#: How long a command waits for another one to finish publishing into the same place (publishing itself takes
#: milliseconds: a few renames, a pointer file and removing older outputs).
LOCK_TIMEOUT_S = 600.0
#: A staging folder whose owner still seems alive is removed anyway when it has not changed for this long
#: (its pid may have been reused by an unrelated process).
STALE_AFTER_S = 24 * 3600.0

_PID = re.compile(r"-(\d+)(?:-\d+)?$")


@contextmanager
def publish_lock(lock_file: Path, what: str) -> Iterator[None]:
    """Hold the lock in `lock_file` (created if missing, never deleted) for the block.

    Args:
        lock_file: the lock file, beside the outputs it guards.
        what: the guarded outputs, for the timeout message (e.g. "the index at /home/index").
    """
    from filelock import FileLock, Timeout

    lock = FileLock(str(lock_file), timeout=LOCK_TIMEOUT_S)
    try:
        lock.acquire()
    except Timeout:
        raise OhloraError(
            f"{what} is locked by another process ({lock_file}) for over {LOCK_TIMEOUT_S:.0f} s — wait for it to "
            "finish or end it, then run the command again"
        ) from None
    try:
        yield
    finally:
        lock.release()


def owner_pid(name: str) -> int | None:
    """The writer's pid in a staging folder name (`.staging-build-<stamp>-<pid>-<n>`, `.sbert.tmp-<pid>`)."""
    found = _PID.search(name)
    return int(found.group(1)) if found else None


def pid_alive(pid: int) -> bool:
    """True when a process with this pid exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def abandoned(folder: Path) -> bool:
    """A staging folder nobody is writing: its owner process is gone, or it has not changed for a day."""
    pid = owner_pid(folder.name)
    if pid is not None and pid == os.getpid():
        return False
    try:
        age = time.time() - folder.stat().st_mtime
    except OSError:
        return False  # already removed by someone else
    return pid is None or not pid_alive(pid) or age > STALE_AFTER_S
