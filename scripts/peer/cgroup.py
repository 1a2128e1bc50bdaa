"""A memory cgroup for the larger-than-memory case, made directly (cgroup v1 `memory` or v2
with the memory controller; no systemd needed), and dropping files from the page cache.

Page cache pages count against the cgroup that first read them, so the model's files are
dropped (POSIX_FADV_DONTNEED) before each run: pages cached outside the cgroup would
otherwise serve reads for free. Pages a run left charged to the cgroup are reclaimed too
(`Cgroup.reclaim`: v1 `memory.force_empty`, v2 `memory.reclaim`), and `resident_bytes`
(mincore) says how much of the files was still cached when a run started, so that every round
can show it began cold.
"""
import contextlib
import ctypes
import mmap
import os

V1 = "/sys/fs/cgroup/memory"
V2 = "/sys/fs/cgroup"


def _try_make(limit):
    name = f"flashmoe-peer-{os.getpid()}"
    if os.path.isfile(os.path.join(V1, "memory.limit_in_bytes")):
        d = os.path.join(V1, name)
        os.mkdir(d)
        with open(os.path.join(d, "memory.limit_in_bytes"), "w") as f:
            f.write(str(limit))
        return d
    if "memory" in open(os.path.join(V2, "cgroup.controllers")).read().split():
        d = os.path.join(V2, name)
        os.mkdir(d)
        with open(os.path.join(d, "memory.max"), "w") as f:
            f.write(str(limit))
        return d
    return None


class Cgroup:
    """A memory cgroup made by `memory_cgroup`: `enter` is the preexec_fn that moves a child
    into it."""

    def __init__(self, path):
        self.path = path
        self.v1 = os.path.isfile(os.path.join(path, "memory.limit_in_bytes"))

    def enter(self):
        with open(os.path.join(self.path, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))

    def reclaim(self):
        """Frees the page cache charged to the cgroup (no process may be in it); False when
        the kernel refused."""
        name, val = ("memory.force_empty", "0") if self.v1 else ("memory.reclaim", "1T")
        try:
            with open(os.path.join(self.path, name), "w") as f:
                f.write(val)
            return True
        except OSError:
            return False

    def stat(self):
        """memory.stat as {field: int}."""
        out = {}
        with open(os.path.join(self.path, "memory.stat")) as f:
            for line in f:
                k, _, v = line.partition(" ")
                with contextlib.suppress(ValueError):
                    out[k] = int(v)
        return out

    def peak(self):
        """Most bytes charged so far (v1 memory.max_usage_in_bytes, v2 memory.peak), or None."""
        name = "memory.max_usage_in_bytes" if self.v1 else "memory.peak"
        try:
            with open(os.path.join(self.path, name)) as f:
                return int(f.read())
        except (OSError, ValueError):
            return None


@contextlib.contextmanager
def memory_cgroup(limit):
    """Yields a Cgroup of `limit` bytes, or None when no cgroup can be made here; removes the
    cgroup afterwards."""
    try:
        d = _try_make(limit)
    except OSError:
        d = None
    if d is None:
        yield None
        return
    try:
        yield Cgroup(d)
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(d)


def resident_bytes(paths):
    """Bytes of these files in the page cache now (mincore over a read-only mapping)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    page = mmap.PAGESIZE
    total = 0
    for p in paths:
        if not os.path.isfile(p) or os.path.getsize(p) == 0:
            continue
        size = os.path.getsize(p)
        fd = os.open(p, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr is None or addr == ctypes.c_void_p(-1).value:
                raise OSError(ctypes.get_errno(), f"mmap of {p} for mincore failed")
            try:
                n = (size + page - 1) // page
                vec = (ctypes.c_ubyte * n)()
                if libc.mincore(addr, size, vec) != 0:
                    raise OSError(ctypes.get_errno(), f"mincore of {p} failed")
                # Bit 0 of each byte: the page is resident (the other bits are reserved).
                total += (n - bytes(vec).count(0)) * page
            finally:
                libc.munmap(addr, size)
        finally:
            os.close(fd)
    return total


def drop_from_page_cache(paths):
    for p in paths:
        if not os.path.isfile(p):
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
