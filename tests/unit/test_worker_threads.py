"""The lifecycle worker's hand-offs between its main thread and its job threads."""

import select
import sys
import threading
import time

import pytest

from virtbroker.workers.lifecycle import JobThreads, Mailbox


def readable(fd: int, timeout_s: float = 0.0) -> bool:
    return bool(select.select([fd], [], [], timeout_s)[0])


def test_mailbox_signals_once_and_hands_items_in_order():
    box = Mailbox()
    try:
        assert not readable(box.fd)
        box.put(1)
        box.put(2)
        assert readable(box.fd)
        assert box.take() == [1, 2]
        assert not readable(box.fd)  # taken: nothing left to wake for
        assert box.take() == []
        box.put(3)
        assert readable(box.fd)
        assert box.take() == [3]
    finally:
        box.close()


@pytest.fixture
def switch_often():
    """Threads switch every microsecond, not every 5 ms: races between put and take get
    a chance to happen in a short test."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


def test_mailbox_never_leaves_an_item_unsignalled_under_concurrent_puts(switch_often):
    """Eight threads put as fast as they can while the main thread sleeps on the fd, as the
    worker's poller does. A lost wake-up leaves items in the box with nothing to wake the
    main thread: the poll below would time out with items missing."""
    box = Mailbox()
    threads_n, per_thread = 8, 3000
    got: list[tuple[int, int]] = []

    def producer(t: int) -> None:
        for i in range(per_thread):
            box.put((t, i))
            if i % 3 == 0:
                time.sleep(0)  # spread the puts over many takes, as finishing jobs are

    producers = [threading.Thread(target=producer, args=(t,)) for t in range(threads_n)]
    try:
        for thread in producers:
            thread.start()
        while len(got) < threads_n * per_thread:
            assert readable(box.fd, timeout_s=2.0), f"no wake-up with {threads_n * per_thread - len(got)} items unseen"
            got.extend(box.take())
        for thread in producers:
            thread.join()
        assert not readable(box.fd) or box.take() == []
        for t in range(threads_n):
            assert [i for tt, i in got if tt == t] == list(range(per_thread))  # each thread's in its order
    finally:
        box.close()


def test_job_threads_run_jobs_concurrently_and_stop():
    started = threading.Barrier(4, timeout=5)  # passes only if 4 jobs run at once
    done = []
    all_done = threading.Event()
    lock = threading.Lock()

    def run(job):
        started.wait()
        with lock:
            done.append(job)
            if len(done) == 8:
                all_done.set()

    pool = JobThreads(4, run, name="t")
    for job in range(8):
        pool.submit(job)
    assert all_done.wait(timeout=10)
    pool.stop()
    for thread in pool._threads:
        thread.join(timeout=5)
        assert not thread.is_alive()
    assert sorted(done) == list(range(8))


def test_job_threads_run_nicer_than_the_thread_that_started_them():
    import os

    from virtbroker.workers.lifecycle import JOB_THREAD_NICE

    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen = []
    done = threading.Event()

    def run(job):
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        done.set()

    pool = JobThreads(1, run, name="t")
    pool.submit("job")
    assert done.wait(timeout=5)
    pool.stop()
    assert seen == [min(19, mine + JOB_THREAD_NICE)]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine  # the caller's is untouched
