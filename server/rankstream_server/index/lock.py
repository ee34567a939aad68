"""One writer per index folder: an exclusive lock (fcntl.flock) on DIR/LOCK, held while a
server, `rankstream index build --force` or `rankstream eval --index` has the folder open for
writing. The holder writes who it is into the file, so a second writer is refused with one
line naming the first: its pid, command line and since when.

flock belongs to the open file, not the process: a second open in the same process is
refused too, and the lock goes when the holder exits, however it exits (even kill -9)."""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from pathlib import Path

from rankstream_server.errors import ModelLoadError

LOCK_FILE = "LOCK"


class IndexLocked(ModelLoadError):
    """Another writer has the index folder open."""


def command_line() -> str:
    program = sys.argv[0] if sys.argv else ""
    if program in ("", "-c"):
        name = f"python {program}".strip()
    elif Path(program).name == "__main__.py":
        name = f"python -m {Path(program).parent.name}"
    else:
        name = Path(program).name
    words = [name, *sys.argv[1:]]
    line = " ".join(words)
    return line if len(line) <= 200 else line[:197] + "..."


class IndexLock:
    """The exclusive lock on one index folder. `acquire` raises IndexLocked when it is held."""

    def __init__(self, folder: Path, fd: int):
        self.folder = folder
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, folder: Path, purpose: str) -> IndexLock:
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(fd)
            os.close(fd)
            raise IndexLocked(
                f"index folder {folder} is in use by {holder}; only one process may write to an index folder: "
                "stop that one first (`rankstream index backup` copies a live index)"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        holder = {
            "pid": os.getpid(),
            "command": command_line(),
            "purpose": purpose,
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        return cls(folder, fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # nobody holds it now
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _describe_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode())
        pid = int(holder["pid"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "another process (it has not said which)"
    who = f"pid {pid}, this process" if pid == os.getpid() else f"pid {pid}"
    purpose = f"; {holder['purpose']}" if holder.get("purpose") else ""
    return f"{who} ({holder.get('command', '?')}{purpose}) since {holder.get('since', '?')}"
