"""Notices a changed configuration file by polling it.

Kubernetes updates a mounted ConfigMap by writing a new folder and swapping the
``..data`` symlink to it: the file's own path never changes, and inotify on it sees
nothing. So each look resolves the path's symlinks and compares the resolved path,
the modification time and size, and, when any of them moved, a hash of the
content: a file touched but not changed is no change.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


class FileWatch:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp = self._stamp_now()
        self._digest = self._digest_now()

    def _stamp_now(self) -> tuple[str, int, int] | None:
        try:
            resolved = os.path.realpath(self.path)
            status = os.stat(resolved)
        except OSError:
            return None
        return resolved, status.st_mtime_ns, status.st_size

    def _digest_now(self) -> bytes | None:
        try:
            return hashlib.sha256(self.path.read_bytes()).digest()
        except OSError:
            return None

    def changed(self) -> bool:
        """Whether the content differs from the last look's (a missing file is no
        change: a swap in progress, or a mistake the next look may see fixed)."""
        stamp = self._stamp_now()
        if stamp is None or stamp == self._stamp:
            return False
        self._stamp = stamp
        digest = self._digest_now()
        if digest is None or digest == self._digest:
            return False
        self._digest = digest
        return True
