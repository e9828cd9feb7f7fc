"""Parallel walks: each part on a thread of its own with torch's ops on one thread
there, and every other thread's torch settings left as they were."""

import gc
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from volume_ray.parallel_walks import ParallelWalks


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_each_part_runs_on_its_own_thread_with_one_op_thread(two_threads):
    walks = ParallelWalks(3)
    seen = {}

    def work(k, part):
        seen[k] = (threading.get_ident(), torch.get_num_threads(), part)
        return part * 10

    assert walks.map(work, [1, 2, 3]) == [10, 20, 30]
    assert sorted(part for _, _, part in seen.values()) == [1, 2, 3]
    assert len({ident for ident, _, _ in seen.values()}) == 3
    assert threading.get_ident() not in {ident for ident, _, _ in seen.values()}
    assert {threads for _, threads, _ in seen.values()} == {1}
    assert walks.map(work, [4]) == [40]  # fewer parts than threads
    assert walks.run(lambda: (threading.get_ident(), torch.get_num_threads())) == (seen[0][0], 1)


def test_other_threads_keep_their_thread_count(two_threads):
    """Neither the caller's thread nor a thread started afterwards sees one op thread,
    even while the walks run."""
    walks = ParallelWalks(2)

    def caller_and_new_thread() -> tuple[int, int]:
        new_thread = ThreadPoolExecutor(1).submit(torch.get_num_threads).result()
        return torch.get_num_threads(), new_thread

    during = walks.map(lambda k, part: part() if k == 0 else torch.get_num_threads(), [
        caller_and_new_thread, None,
    ])  # fmt: skip
    assert during == [(1, 2), 1]
    assert torch.get_num_threads() == 2
    assert ThreadPoolExecutor(1).submit(torch.get_num_threads).result() == 2


def test_one_walk_runs_on_the_calling_thread_as_it_is(two_threads):
    walks = ParallelWalks(1)
    me = (threading.get_ident(), 2)
    assert walks.map(lambda k, part: (threading.get_ident(), torch.get_num_threads()), [0]) == [me]
    assert walks.run(lambda: (threading.get_ident(), torch.get_num_threads())) == me


@pytest.mark.parametrize("failing", [0, 1])
def test_a_failing_walk_raises_once_every_walk_has_finished(two_threads, failing):
    finished = []

    def work(k, part):
        if k == failing:
            raise RuntimeError(f"walk {k} broke")
        time.sleep(0.1)
        finished.append(k)

    with pytest.raises(RuntimeError, match=f"walk {failing} broke"):
        ParallelWalks(2).map(work, ["a", "b"])
    assert finished == [1 - failing]
    assert torch.get_num_threads() == 2


def test_bad_counts_are_refused():
    with pytest.raises(ValueError, match="parallel_walks must be at least 1"):
        ParallelWalks(0)
    with pytest.raises(ValueError, match="1 to 2 parts, got 3"):
        ParallelWalks(2).map(lambda k, part: part, [1, 2, 3])
    with pytest.raises(ValueError, match="1 to 2 parts, got 0"):
        ParallelWalks(2).map(lambda k, part: part, [])


def test_the_threads_end_with_the_walks(two_threads):
    walks = ParallelWalks(3)
    threads = walks.map(lambda k, part: threading.current_thread(), [0, 1, 2])
    assert all(thread.is_alive() for thread in threads)
    del walks
    gc.collect()
    for thread in threads:
        thread.join(timeout=5)
        assert not thread.is_alive(), "a walk's thread outlived its ParallelWalks"
