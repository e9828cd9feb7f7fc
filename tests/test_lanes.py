"""Lanes: each part on a thread of its own, torch's ops on one thread there, and the
thread count restored however the lanes end."""

import gc
import threading
import time

import pytest
import torch

from volume_ray.lanes import Lanes, one_op_thread


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_each_part_runs_on_its_own_thread_with_one_op_thread(two_threads):
    lanes = Lanes(3)
    seen = {}

    def work(lane, part):
        seen[lane] = (threading.get_ident(), torch.get_num_threads(), part)
        time.sleep(0.05)  # all three at once, or the pool could reuse a thread
        return part * 10

    assert lanes.map(work, [1, 2, 3]) == [10, 20, 30]
    assert sorted(part for _, _, part in seen.values()) == [1, 2, 3]
    assert len({ident for ident, _, _ in seen.values()}) == 3
    assert seen[0][0] == threading.get_ident()  # lane 0 is the caller
    assert {threads for _, threads, _ in seen.values()} == {1}
    assert torch.get_num_threads() == 2
    assert lanes.map(work, [4]) == [40]  # fewer parts than lanes
    assert torch.get_num_threads() == 2


def test_one_lane_leaves_torch_threads_as_they_are(two_threads):
    lanes = Lanes(1)
    assert lanes.map(lambda lane, part: (threading.get_ident(), torch.get_num_threads()), [0]) == [
        (threading.get_ident(), 2)
    ]
    with lanes.op_threads():
        assert torch.get_num_threads() == 2
    with Lanes(2).op_threads():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("failing", [0, 1])
def test_a_failing_lane_raises_once_every_lane_has_finished(two_threads, failing):
    finished = []

    def work(lane, part):
        if lane == failing:
            raise RuntimeError(f"lane {lane} broke")
        time.sleep(0.1)
        finished.append(lane)

    with pytest.raises(RuntimeError, match=f"lane {failing} broke"):
        Lanes(2).map(work, ["a", "b"])
    assert finished == [1 - failing]
    assert torch.get_num_threads() == 2


def test_the_thread_count_comes_back_after_an_error(two_threads):
    with pytest.raises(KeyError), one_op_thread():
        assert torch.get_num_threads() == 1
        raise KeyError("x")
    assert torch.get_num_threads() == 2


def test_bad_counts_are_refused():
    with pytest.raises(ValueError, match="count must be at least 1"):
        Lanes(0)
    with pytest.raises(ValueError, match="1 to 2 parts, got 3"):
        Lanes(2).map(lambda lane, part: part, [1, 2, 3])
    with pytest.raises(ValueError, match="1 to 2 parts, got 0"):
        Lanes(2).map(lambda lane, part: part, [])


def test_the_lanes_threads_end_with_them(two_threads):
    lanes = Lanes(3)

    def work(lane, part):
        time.sleep(0.02)
        return threading.current_thread()

    pool_threads = lanes.map(work, [0, 1, 2])[1:]
    assert all(thread.is_alive() for thread in pool_threads)
    del lanes
    gc.collect()
    for thread in pool_threads:
        thread.join(timeout=5)
        assert not thread.is_alive(), "a lane's thread outlived its lanes"
