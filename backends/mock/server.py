"""The device server: one mock accelerator behind hetero.device.v1.Device.

It puts the parts together and runs them: the engine (tiny model, roofline
timing), the KV handoff with its data plane, and the gRPC service in front.
"""

from __future__ import annotations

import grpc

from backends import kvlayout
from backends.mock.clock import LoopClock
from backends.mock.config import DeviceConfig, layout_of, timing_of
from backends.mock.dataplane import DataPlaneServer
from backends.mock.engine import DeviceEngine
from backends.mock.faults import FaultyKVBytes
from backends.mock.kv_bytes import KVBytes, LeaseBytes
from backends.mock.kv_events import KVEventPublisher
from backends.mock.kv_handoff import KVHandoff
from backends.mock.model import TinyConfig, TinyTransformer
from backends.mock.protocol import CHANNEL_OPTIONS
from backends.mock.service import DeviceService, register


class DeviceServer:
    """One device: ``start`` serves it, ``stop`` ends it; ``clock`` paces all it models."""

    def __init__(self, config: DeviceConfig, clock: LoopClock | None = None) -> None:
        self.config = config
        clock = clock or LoopClock()
        model = TinyTransformer(TinyConfig(seed=config.seed))
        self.layout = layout_of(config, model.config)
        self.timing = timing_of(config)
        self.engine = DeviceEngine(
            model,
            self.timing,
            time_scale=config.time_scale,
            kv_lease_s=config.kv_lease_s,
            kv_capacity_tokens=config.kv_capacity_tokens,
            decode_step_s=config.decode_step_s,
            prefix_cache_blocks=config.prefix_cache_blocks,
            kv_layout=self.layout,
            filler_bytes_per_token=(
                max(0, self.timing.model.kv_bytes_per_token - kvlayout.token_bytes(self.layout))
                if config.emulate_kv_size
                else 0
            ),
            clock=clock,
        )
        served: KVBytes = LeaseBytes(self.engine.lease)
        if config.break_kv_transfers or config.corrupt_kv_chunks:
            served = FaultyKVBytes(
                served, breaks=config.break_kv_transfers, corruptions=config.corrupt_kv_chunks
            )
        self.kv = KVHandoff(
            config, self.engine, self.layout, self.timing, served=served, clock=clock
        )
        self._data_plane = DataPlaneServer(served.served, self.kv.relay_sink())
        self.service = DeviceService(
            config, self.engine, self.layout, self.kv, lambda: self.kv_bytes_sent
        )
        self.kv_events: KVEventPublisher | None = None
        self._server: grpc.aio.Server | None = None

    @property
    def address(self) -> str:
        return self.kv.address

    # What reached this device, for tests.
    @property
    def requests_received(self) -> int:
        return self.service.requests_received

    @property
    def kv_recomputes(self) -> int:
        return self.kv.recomputes

    @property
    def kv_pull_attempts(self) -> int:
        return self.kv.pull_attempts

    @property
    def kv_fetches_served(self) -> int:
        return self.kv.fetches_served

    @property
    def kv_bytes_sent(self) -> int:
        """KV payload bytes sent to pullers and relays, over the data plane and FetchKV."""
        return self._data_plane.bytes_sent + self.kv.fetch_bytes_sent

    async def start(self, listen: str = "127.0.0.1:0") -> int:
        """Serves on ``listen``; returns the bound port (useful with port 0)."""
        # No SO_REUSEPORT: a second device on a taken port fails instead of sharing it.
        self._server = grpc.aio.server(options=[*CHANNEL_OPTIONS, ("grpc.so_reuseport", 0)])
        register(self.service, self._server)
        try:
            port: int = self._server.add_insecure_port(listen)
        except RuntimeError:  # grpc's way to say it could not bind
            port = 0
        if port == 0:
            raise OSError(f"cannot listen on {listen}")
        host = listen.rpartition(":")[0]
        self.kv.address = f"{host}:{port}"
        if self.config.kv_data_plane:
            data_port = await self._data_plane.start(host)
            self.kv.data_address = f"{host}:{data_port}"
        self._start_kv_events(host)
        self.engine.start()
        await self._server.start()
        return port

    def _start_kv_events(self, host: str) -> None:
        config = self.config
        if config.kv_events_port is None:
            return
        self.kv_events = KVEventPublisher(
            host,
            config.kv_events_port,
            config.kv_events_replay_port,
            config.kv_events_topic,
            drop_first=config.drop_kv_event_batches,
        )
        self.kv_events.start()
        self.engine.prefix_cache.listener = self.kv_events.cache_changed

    async def stop(self, grace_s: float | None = 1.0) -> None:
        if self._server is not None:
            await self._server.stop(grace_s)
        await self._data_plane.stop()
        await self.engine.stop()
        await self.kv.close()
        if self.kv_events is not None:
            await self.kv_events.stop()

    async def wait_for_termination(self) -> None:
        if self._server is None:
            raise RuntimeError(f"device {self.config.backend_id}: start() first")
        await self._server.wait_for_termination()
