"""The parts of --workers that need no worker process: the parent's hold on the ports,
one /metrics answer for several workers, and the setting itself."""

from __future__ import annotations

import errno
import socket
from pathlib import Path

import prometheus_client.metrics
import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from router.api.worker_metrics import WorkerMetrics
from router.errors import ConfigError
from router.settings import MAX_WORKERS, settings_from
from router.workers import BACKOFF_MAX_S, hold_port, restart_delay_s


def reuseport_listener(port: int) -> socket.socket:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen()
    return listener


def test_port_zero_is_held_on_one_concrete_port_that_workers_can_share_and_others_cannot() -> None:
    held, address = hold_port("127.0.0.1:0", "HTTP")
    try:
        host, _, port_text = address.rpartition(":")
        port = int(port_text)
        assert (host, len(held)) == ("127.0.0.1", 1)
        assert port != 0
        with reuseport_listener(port), reuseport_listener(port):
            pass  # two workers bind it beside the parent's hold
        plain = socket.socket()
        with plain, pytest.raises(OSError, match="in use") as refused:
            plain.bind(("127.0.0.1", port))  # a process not sharing the port cannot take it
        assert refused.value.errno == errno.EADDRINUSE
    finally:
        for sock in held:
            sock.close()


def test_holding_a_port_another_process_listens_on_is_refused_in_one_line() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(OSError, match=f"^cannot listen on {address} for gRPC: address in use$"):
            hold_port(address, "gRPC")


def test_ipv6_addresses_keep_their_brackets() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    try:
        held, address = hold_port("[::1]:0", "gRPC")
    except OSError:
        pytest.skip("no ::1 here")
    for sock in held:
        sock.close()
    assert address.startswith("[::1]:")
    assert not address.endswith(":0")


def registry_counting(requests: float) -> CollectorRegistry:
    registry = CollectorRegistry()
    counter = Counter("demo_requests", "Requests.", ["model"], registry=registry)
    counter.labels(model="m").inc(requests)
    return registry


async def test_a_scrape_of_any_worker_holds_every_workers_series_labelled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With _created series (RouterMetrics turns them off for the process), whose text
    # form is a family of its own: the case where merging collect() and text went wrong.
    monkeypatch.setattr(prometheus_client.metrics, "_use_created", True)
    first = WorkerMetrics(registry_counting(3), 0, 3, tmp_path)
    second = WorkerMetrics(registry_counting(5), 1, 3, tmp_path)
    await first.start()
    await second.start()  # the third never started: left out of the scrape
    try:
        for worker in (first, second):
            text = (await worker.metrics()).decode()
            families = {f.name: f for f in text_string_to_metric_families(text)}
            totals = {
                sample.labels["worker"]: sample.value
                for sample in families["demo_requests"].samples
                if sample.name == "demo_requests_total"
            }
            assert totals == {"0": 3.0, "1": 5.0}
            assert families["hetero_router_workers_scraped"].samples[0].value == 2.0
            # One family per name: HELP and TYPE said once, as Prometheus requires.
            types = [line for line in text.splitlines() if line.startswith("# TYPE ")]
            assert len(types) == len(set(types))
            assert "# TYPE demo_requests_total counter" in types
            assert "# TYPE demo_requests_created gauge" in types
    finally:
        await first.stop()
        await second.stop()


def test_workers_setting_is_bounded_and_names_the_flag() -> None:
    assert settings_from({}).workers == 1
    assert settings_from({"workers": 4}).workers == 4
    with pytest.raises(ConfigError, match="--workers"):
        settings_from({"workers": 0}, {"workers": "--workers"})
    with pytest.raises(ConfigError, match="--workers"):
        settings_from({"workers": MAX_WORKERS + 1}, {"workers": "--workers"})


def test_restarts_in_a_row_wait_twice_as_long_each_time_up_to_the_cap() -> None:
    delays = [restart_delay_s(n) for n in range(1, 12)]
    assert delays[:4] == [0.25, 0.5, 1.0, 2.0]
    assert delays[-1] == BACKOFF_MAX_S
    assert delays == sorted(delays)


async def test_a_workers_restarts_carried_from_the_parent_are_in_every_scrape(
    tmp_path: Path,
) -> None:
    first = WorkerMetrics(registry_counting(1), 0, 2, tmp_path)
    second = WorkerMetrics(registry_counting(1), 1, 2, tmp_path, restarts=3)
    await first.start()
    await second.start()
    try:
        text = (await first.metrics()).decode()
        restarts = {
            sample.labels["worker"]: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "hetero_router_worker_restarts_total"
        }
        assert restarts == {"0": 0.0, "1": 3.0}
    finally:
        await first.stop()
        await second.stop()
