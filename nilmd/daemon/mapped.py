"""A file in the runtime directory (a tmpfs), mapped into every process that opens it.

The ring buffer and the control block are both one of these. Subclasses keep their numpy views
in the attributes named by VIEWS, so close() can drop them before unmapping: numpy views made
with np.frombuffer make mmap.close() raise BufferError while any view lives (the safe failure),
where np.ndarray(buffer=...) would segfault later (docs/DESIGN.md §1).
"""

from __future__ import annotations

import mmap
import os


class MappedFile:
    VIEWS: tuple[str, ...] = ()

    def __init__(self, path: str, fd: int, mm: mmap.mmap):
        self.path = path
        self._fd = fd
        self._mm = mm

    @classmethod
    def _open(cls, path: str, size: int | None):
        """Create (size given: truncated to `size`, mode 0600) or attach (size None) and map."""
        if size is None:
            fd = os.open(path, os.O_RDWR)
        else:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            if size is not None:
                os.ftruncate(fd, size)
            mm = mmap.mmap(fd, os.fstat(fd).st_size)
        except BaseException:
            os.close(fd)
            raise
        return fd, mm

    def close(self) -> None:
        """Unmap. Raises BufferError if a caller still holds a view (instead of segfaulting)."""
        for name in self.VIEWS:
            self.__dict__.pop(name, None)
        if not self._mm.closed:
            self._mm.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def drop_resident(self) -> None:
        """Forget this process's resident copy of the pages (MADV_DONTNEED): the data stays in the
        file, and a page read again is mapped again. The supervisor restores a snapshot into a ring
        and then reads only its header; without this every ring would count in its RSS too."""
        self._mm.madvise(mmap.MADV_DONTNEED)

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
