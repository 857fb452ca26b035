"""The private Ray internals raykd reads (``raykd.raycompat``) still exist in the installed Ray, and
the adapter stands aside outside a trial and on a Ray it was not written for."""

from __future__ import annotations

import inspect
import logging
import time

import ray

from raykd import raycompat


def test_the_installed_ray_is_the_line_the_adapter_was_written_for():
    assert raycompat.version_supported(), (ray.__version__, raycompat.WRITTEN_FOR)
    assert raycompat.version_supported("2.60.0") and raycompat.version_supported("2.60")
    assert not raycompat.version_supported("2.61.0") and not raycompat.version_supported("2.6.0")


def test_the_private_session_fields_it_reads_exist():
    from ray.train._internal import session

    assert callable(session.get_session)
    init = inspect.getsource(session._TrainSession)
    assert "self.result_queue = queue.Queue(1)" in init  # the one-slot queue of the race
    assert "self._inter_actor_queue" in init


def test_outside_a_trial_there_is_nothing_to_wait_for():
    assert raycompat.trial_session() is None
    t0 = time.monotonic()
    assert raycompat.wait_for_trial_reports(timeout_s=5) is True
    assert time.monotonic() - t0 < 1


def test_on_another_ray_it_skips_the_wait_and_says_so(monkeypatch, caplog):
    monkeypatch.setattr(ray, "__version__", "9.0.0")
    monkeypatch.setattr(raycompat, "_warned", False)
    with caplog.at_level(logging.WARNING, logger="raykd.raycompat"):
        assert raycompat.wait_for_trial_reports(timeout_s=5) is True
        assert raycompat.wait_for_trial_reports(timeout_s=5) is True
    assert [r.getMessage() for r in caplog.records].count(
        caplog.records[0].getMessage()) == 1 and "written for Ray 2.60" in caplog.records[0].getMessage()


def test_the_serve_controller_names_and_http_config_reader_it_uses_exist():
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE
    from ray.serve._private.controller import ServeController

    assert isinstance(SERVE_CONTROLLER_NAME, str) and isinstance(SERVE_NAMESPACE, str)
    assert "HTTPOptions" in str(inspect.signature(ServeController.get_http_config).return_annotation)
    if not ray.is_initialized():
        assert raycompat.serve_http_host() is None  # not connected: unknown, and Ray stays down
        assert not ray.is_initialized()


def test_cluster_resource_readers_exist_and_answer_on_a_local_cluster(ray_cluster):
    from ray._private.state import available_resources_per_node, state

    assert callable(available_resources_per_node) and callable(state.get_max_resources_from_cluster_config)
    free = raycompat.free_resources_per_node()
    assert free and all("CPU" in r for r in free.values())  # one entry per alive node
    assert raycompat.autoscaler_max_resources() == {}  # a local cluster has no autoscaler config
    assert raycompat.train_group_start_timeout_s() > 0  # Ray Train's private start-timeout constant

    from raykd.cluster import cluster_capacity

    assert cluster_capacity()["CPU"] == ray.cluster_resources()["CPU"]
