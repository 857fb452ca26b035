"""A rank never waits silently for data, and a restarted worker group leaves its data pipeline room.

Ray-free: the watchdog (:class:`raykd.train.feed.Feed`) on plain iterators, and the sizing rules
(:func:`raykd.train.trainer.group_size`) on made-up clusters. The run on a real 2-node cluster
that loses a node is in ``tests/test_multinode.py``.
"""

from __future__ import annotations

import threading
import time

import pytest

from raykd.config import RunConfig, ScalingConfig
from raykd.data.dataset import DATA_TASK_CPUS
from raykd.train.feed import DataStallError, Feed
from raykd.train.trainer import data_room, group_size, pack_spare


def _slow(items, delay_s: float):
    for item in items:
        time.sleep(delay_s)
        yield item


def test_a_feed_yields_every_batch_in_order_and_counts_its_wait():
    feed = Feed(_slow(range(5), 0.05), stall_s=10)
    assert list(feed) == [0, 1, 2, 3, 4]
    assert 0.15 < feed.wait_s < 2.0  # the consumer did nothing but wait


def test_a_feed_raises_the_iterators_own_error():
    def broken():
        yield 1
        raise ValueError("shard lost")

    with pytest.raises(ValueError, match="shard lost"):
        list(Feed(broken(), stall_s=10))


def test_no_batch_within_the_stall_timeout_is_an_error_naming_the_wait():
    never = threading.Event()

    def stuck():
        never.wait()
        yield 1

    t0 = time.perf_counter()
    with pytest.raises(DataStallError, match=r"no train batch on rank 0 for [34] s \(train.stall_timeout_s\)"):
        list(Feed(stuck(), stall_s=3, what="train batch on rank 0"))
    assert time.perf_counter() - t0 < 6


def test_a_diagnosis_ends_the_wait_early_with_its_reason():
    calls = []

    def diagnose():
        calls.append(time.perf_counter())
        return "no CPU left for Ray Data" if len(calls) >= 2 else None

    never = threading.Event()

    def stuck():
        never.wait()
        yield 1

    t0 = time.perf_counter()
    with pytest.raises(DataStallError, match="no CPU left for Ray Data"):
        list(Feed(stuck(), stall_s=600, diagnose=diagnose, check_after_s=1.0))
    assert len(calls) == 2 and time.perf_counter() - t0 < 10  # asked after 1 s, again 5 s later
    assert calls[1] - calls[0] == pytest.approx(5.0, abs=1.5)


def test_a_consumer_that_stops_early_frees_the_pulling_thread():
    pulled = []

    def endless():
        i = 0
        while True:
            pulled.append(i)
            yield i
            i += 1

    before = set(threading.enumerate())
    for batch in Feed(endless(), stall_s=10, depth=2):
        if batch == 3:
            break
    time.sleep(2.5)  # the thread notices the stop within a poll
    n = len(pulled)
    time.sleep(1.5)
    assert len(pulled) == n and n <= 3 + 2 + 2
    assert not [t for t in set(threading.enumerate()) - before if t.name == "raykd-feed"]


def test_pack_spare_is_the_most_cpu_one_node_keeps_when_the_biggest_nodes_fill_first():
    assert pack_spare({"a": 1.0, "b": 1.0}, 2, 0.5) == 1.0  # both on one node, the other free
    assert pack_spare({"a": 1.0}, 2, 0.5) == 0.0
    assert pack_spare({"a": 1.0}, 3, 0.5) is None
    assert pack_spare({"a": 4.0, "b": 2.0}, 5, 1.0) == 1.0
    assert pack_spare({"a": 1.0, "b": 1.0}, 4, 0.4) == pytest.approx(0.2)  # 0.2 left on each, no 0.25 anywhere
    assert data_room({"a": 1.0, "b": 1.0}, ["a", "a"], 0.5) == 1.0
    assert data_room({"a": 1.0}, ["a", "a"], 0.5) == 0.0
    assert data_room({"a": 1.0}, ["a", "b"], 0.5) == 0.5  # b's rank is gone with its node


def _cfg(workers: int, per: float) -> RunConfig:
    return RunConfig(name="sizing", scaling=ScalingConfig(num_workers=workers, cpus_per_worker=per))


def test_a_restarted_group_shrinks_to_what_leaves_ray_data_a_task():
    shipped = _cfg(2, 0.5)  # configs/tiny_cpu.yaml
    assert DATA_TASK_CPUS == 0.25
    assert group_size(shipped, {"a": 1.0, "b": 1.0}, restart=False) == 2
    assert group_size(shipped, {"a": 1.0}, restart=True) == 1  # the survivor of a 2-node cluster
    assert group_size(shipped, {"a": 1.0}, restart=False) == 1  # it would starve at the start too
    assert group_size(_cfg(4, 1.0), {"a": 2.0}, restart=False) == 4  # too small for the group: wait for nodes
    assert group_size(_cfg(4, 1.0), {"a": 2.0}, restart=True) == 1
    assert group_size(_cfg(2, 1.0), {"a": 1.0}, restart=True) == 2  # nothing fits with room: wait, then fail
    assert group_size(_cfg(2, 0.5), {}, restart=True) == 2
    assert group_size(_cfg(3, 0.0), {"a": 1.0}, restart=True) == 3  # workers that hold no CPU


def test_an_epoch_reports_the_share_of_its_time_spent_waiting_for_batches():
    import types

    import torch

    from raykd.train.loop import train_epoch

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, images, targets):
            time.sleep(0.02)  # the step's own work
            loss = torch.nn.functional.cross_entropy(self.fc(images), targets)
            return types.SimpleNamespace(loss=loss, parts={})

    model = Tiny()
    batches = _slow([{"image": torch.randn(8, 4), "label": torch.zeros(8, dtype=torch.long)}] * 5, 0.06)
    stats = train_epoch(model, batches, torch.optim.SGD(model.parameters(), lr=0.1),
                        types.SimpleNamespace(after_step=lambda: None), epoch=0, method_name="baseline",
                        device=torch.device("cpu"))
    assert stats["train/data_wait_s"] == pytest.approx(0.3, abs=0.1)
    assert 0.6 < stats["train/data_wait_share"] < 0.9  # 60 ms waiting for each 20 ms step
