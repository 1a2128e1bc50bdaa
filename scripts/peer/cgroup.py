"""A memory cgroup for the larger-than-memory case, made directly (cgroup v1 `memory` or v2
with the memory controller; no systemd needed), and dropping files from the page cache.

Page cache pages count against the cgroup that first read them, so the model's files are
dropped (POSIX_FADV_DONTNEED) before each run: pages cached outside the cgroup would
otherwise serve reads for free.
"""
import contextlib
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


@contextlib.contextmanager
def memory_cgroup(limit):
    """Yields a preexec_fn that moves the child into a cgroup of `limit` bytes, or None when
    no cgroup can be made here; removes the cgroup afterwards."""
    try:
        d = _try_make(limit)
    except OSError:
        d = None
    if d is None:
        yield None
        return

    def enter():
        with open(os.path.join(d, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))

    try:
        yield enter
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(d)


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
