"""A multiprocessing pool for the e2e matrix: worker processes add to slots of a POSIX shared
memory block (/dev/shm/<name>) that the parent created; the pool's own locks are POSIX semaphores
and its queues pipes. Every tick the parent hands out one task per slot and prints, in the counter
format the harness parses, "<n> shm=ok|bad total=<sum of slots> workers=<pids>": shm=ok means the
slots add up to what the workers were asked to do so far."""
import os
import struct
import time
from multiprocessing import Pool, shared_memory

SLOTS = 8
NAME = "stasis-pool-" + str(os.getpid())


def work(slot):
    shm = _attach()
    v = struct.unpack_from("q", shm.buf, slot * 8)[0]
    struct.pack_into("q", shm.buf, slot * 8, v + 1)
    return os.getpid()


_shm = None


def _attach():
    global _shm
    if _shm is None:  # each worker maps the block once and keeps it
        _shm = shared_memory.SharedMemory(name=NAME)
    return _shm


def main():
    shm = shared_memory.SharedMemory(name=NAME, create=True, size=SLOTS * 8)
    shm.buf[:] = bytes(SLOTS * 8)
    print(f"start pid={os.getpid()} shm=/dev/shm/{NAME}", flush=True)
    with Pool(processes=2) as pool:
        n = 0
        while True:
            pids = sorted(set(pool.map(work, range(SLOTS))))
            total = sum(struct.unpack_from("q", shm.buf, i * 8)[0] for i in range(SLOTS))
            ok = "ok" if total == SLOTS * (n + 1) else "bad"
            print(f"{n} shm={ok} total={total} workers={','.join(map(str, pids))}", flush=True)
            n += 1
            time.sleep(0.5)


if __name__ == "__main__":
    main()
