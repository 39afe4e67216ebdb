"""The test Harness is the production object graph (app.build) with doubles at its edges."""

from __future__ import annotations

import pytest

from ecr_twisted.registry.handler import ProxyConfig
from ecr_twisted.testing.doubles import UPSTREAM, ClosingTransport, Harness


def test_the_harness_is_built_by_the_composition_root(tmp_path) -> None:
    h = Harness(ProxyConfig(upstream=UPSTREAM, blob_mode="redirect"), cache_dir=str(tmp_path / "cache"))
    proxy = h.built.proxy
    assert (h.handler, h.pool, h.gate, h.cache, h.keeper) == (proxy.handler, proxy.pool, proxy.gate, proxy.cache,
                                                              proxy.keeper)
    assert h.factory is h.built.factories[0] and h.factory.handler is h.handler and h.factory.pool is h.pool
    assert h.handler.config is h.config and h.config.blob_mode == "redirect"
    assert h.config.upstream is not None and h.config.upstream.key == UPSTREAM.key
    assert h.pool.reactor is h.reactor and h.keeper._clock is h.reactor and h.cache is not None
    assert h.cache.clock is h.reactor and h.handler.tokens is h.keeper


def test_passthrough_wires_no_keeper_but_the_test_still_holds_one() -> None:
    h = Harness(ProxyConfig(upstream=UPSTREAM, passthrough=True))
    assert h.handler.tokens is None and h.keeper.current is not None


def test_a_config_no_options_can_make_is_refused() -> None:
    with pytest.raises(ValueError, match="no options make"):
        Harness(ProxyConfig(passthrough=True))  # passthrough names its registry by --upstream or --registry-id


def test_close_takes_back_connection_lost_calls_not_yet_delivered() -> None:
    h = Harness()
    proto, _ = h.client()
    proto.dataReceived(b"GET /v2/app/manifests/latest HTTP/1.1\r\nHost: registry.example.com\r\n\r\n")
    _, conn, upstream = h.upstreams.connections[-1]
    assert isinstance(upstream, ClosingTransport)
    upstream.loseConnection()
    assert upstream.lost_call is not None and upstream.lost_call.active()
    h.close()
    assert not upstream.lost_call.active()
