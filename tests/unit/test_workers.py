"""--workers: metrics of several processes summed into one exposition; listener binding."""

import socket

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ecr_twisted.observe.metrics import Metrics
from ecr_twisted.app.supervisor import ListenerError, bind_listener
from ecr_twisted.observe.metrics import merge_expositions


def exposition(requests: int, in_flight: int, expiry: float) -> bytes:
    registry = CollectorRegistry()
    m = Metrics(registry)
    for _ in range(requests):
        m.observe_request(b"GET", "blob", 200, 0.02, 0, 100)
    m.in_flight.set(in_flight)
    m.token_result("success", expiry)
    return generate_latest(registry)


def samples(text: bytes) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text.decode())
        for s in fam.samples
    }


def test_merge_sums_counters_histograms_and_in_flight_and_keeps_the_latest_expiry() -> None:
    merged = samples(merge_expositions([exposition(3, 1, 1000.0), exposition(4, 2, 2000.0)]))
    key = (("method", "GET"), ("route", "blob"), ("status", "200"))
    assert merged[("ecrproxy_requests_total", key)] == 7
    assert merged[("ecrproxy_response_body_bytes_total", (("route", "blob"),))] == 700
    assert merged[("ecrproxy_request_duration_seconds_count", (("route", "blob"),))] == 7
    assert merged[("ecrproxy_request_duration_seconds_bucket", (("le", "0.025"), ("route", "blob")))] == 7
    assert merged[("ecrproxy_requests_in_flight", ())] == 3
    assert merged[("ecrproxy_token_expiry_timestamp_seconds", (("upstream", "default"),))] == 2000.0
    assert merged[("ecrproxy_token_refresh_total", (("result", "success"), ("upstream", "default")))] == 2


def test_bind_listener_forms() -> None:
    sock = bind_listener("tcp:0:interface=127.0.0.1")
    try:
        assert sock.family == socket.AF_INET and sock.getsockname()[0] == "127.0.0.1"
        assert sock.get_inheritable()
    finally:
        sock.close()
    with pytest.raises(ListenerError, match="--workers needs"):
        bind_listener("systemd:domain=INET:index=0")


def test_worker_metrics_answers_are_read_with_the_strict_parser() -> None:
    from ecr_twisted.app.supervisor import metrics_body

    body = b"ecrproxy_requests_in_flight 1.0\n"
    head = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % len(body)
    assert metrics_body(head + body) == body
    assert metrics_body(b"HTTP/1.0 200 OK\r\n\r\n" + body) == body  # until close
    assert metrics_body(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\necrpr\r\n0\r\n\r\n") == b"ecrpr"
    for bad in (head + body[:-3], b"HTTP/1.0 500 Oops\r\nContent-Length: 0\r\n\r\n", b"HTTP/1.0 200 OK\r\n",
                b"garbage\r\n\r\n", b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx"):
        with pytest.raises(ValueError, match="bad worker metrics answer"):
            metrics_body(bad)


def test_a_pending_restart_is_cancelled_when_the_supervisor_stops(tmp_path) -> None:
    from twisted.internet.error import ProcessTerminated
    from twisted.internet.testing import MemoryReactorClock
    from twisted.python.failure import Failure

    from ecr_twisted.app.supervisor import WorkerProcesses

    class Spawning(MemoryReactorClock):
        def __init__(self) -> None:
            super().__init__()
            self.spawned: list[object] = []

        def spawnProcess(self, proto, executable, args, env=None, path=None, uid=None, gid=None,
                         usePTY=False, childFDs=None):
            self.spawned.append(proto)

    reactor = Spawning()
    workers = WorkerProcesses(reactor, 2, ["--anonymous"], [], str(tmp_path))
    workers.startService()
    [child] = reactor.spawned
    child.processEnded(Failure(ProcessTerminated(signal=9)))  # type: ignore[attr-defined]
    [restart] = reactor.getDelayedCalls()
    assert restart.active()
    workers.stopService()
    assert not restart.active()
    reactor.advance(workers.restart_delay)
    assert len(reactor.spawned) == 1


def test_merge_of_process_series_sums_what_adds_up_and_keeps_the_tightest_limit() -> None:
    def process(rss: float, fds: float, max_fds: float, start: float, cpu: float) -> bytes:
        return (
            b"# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes %f\n"
            b"# TYPE process_open_fds gauge\nprocess_open_fds %f\n"
            b"# TYPE process_max_fds gauge\nprocess_max_fds %f\n"
            b"# TYPE process_start_time_seconds gauge\nprocess_start_time_seconds %f\n"
            b"# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total %f\n"
            b"# TYPE ecrproxy_build_info gauge\necrproxy_build_info{version=\"0.1.0\"} 1.0\n"
        ) % (rss, fds, max_fds, start, cpu)

    merged = samples(merge_expositions([process(50e6, 10, 1024, 100, 1.5), process(60e6, 20, 512, 200, 2.5)]))
    assert merged[("process_resident_memory_bytes", ())] == 110e6
    assert merged[("process_open_fds", ())] == 30
    assert merged[("process_cpu_seconds_total", ())] == 4.0
    assert merged[("process_max_fds", ())] == 512
    assert merged[("process_start_time_seconds", ())] == 100
    assert merged[("ecrproxy_build_info", (("version", "0.1.0"),))] == 1


# ---------------------------------------------------------------- SO_REUSEPORT listeners
def _accept_all(sock: socket.socket) -> int:
    taken = 0
    while True:
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            return taken
        conn.close()
        taken += 1


def test_a_shared_tcp_listener_lets_children_bind_their_own_and_the_kernel_spreads_connections() -> None:
    from ecr_twisted.app.supervisor import child_listener, join_listener

    spec = "tcp:0:interface=127.0.0.1"
    main = bind_listener(spec, share=True)
    try:
        assert not main.get_inheritable()  # no other process holds it without accepting on it
        shared = child_listener(spec, main)
        assert shared.fd is None and shared.address == main.getsockname() and shared.family == socket.AF_INET
        assert shared.backlog > 0
        child = join_listener(shared)
        try:
            assert child.getsockname() == main.getsockname()
            assert not child.get_inheritable()
            taken = {"main": 0, "child": 0}
            for _ in range(64):
                with socket.create_connection(main.getsockname(), timeout=5):
                    taken["main"] += _accept_all(main)
                    taken["child"] += _accept_all(child)
            # each new connection is hashed to one of the two sockets: both get a share
            assert taken["main"] + taken["child"] == 64 and min(taken.values()) >= 8, taken
        finally:
            child.close()
    finally:
        main.close()


def test_a_port_in_use_is_refused_even_when_its_owner_shares_it() -> None:
    # another process's plain listener, or another --workers group's shared one: the bind fails
    # (the main process binds exclusively; only its children join its sockets)
    for owner_shares in (False, True):
        owner = bind_listener("tcp:0:interface=127.0.0.1", share=owner_shares)
        try:
            port = owner.getsockname()[1]
            with pytest.raises(ListenerError, match="Address already in use"):
                bind_listener(f"tcp:{port}:interface=127.0.0.1", share=True)
        finally:
            owner.close()


def test_unix_listeners_are_inherited(tmp_path) -> None:
    from ecr_twisted.app.supervisor import child_listener

    spec = f"unix:{tmp_path / 'proxy.sock'}"
    sock = bind_listener(spec, share=True)
    try:
        assert child_listener(spec, sock).fd == sock.fileno()
    finally:
        sock.close()


def test_child_listeners_travel_as_json() -> None:
    from ecr_twisted.app.supervisor import ChildListener, decode_listeners, encode_listeners

    listeners = [
        ChildListener(fd=3),
        ChildListener(family=socket.AF_INET6, address=("::1", 8443, 0, 0), backlog=4096),
        ChildListener(family=socket.AF_INET, address=("127.0.0.1", 5000), backlog=7),
    ]
    assert decode_listeners(encode_listeners(listeners)) == tuple(listeners)


def test_children_get_inherited_descriptors_renumbered_and_the_addresses_to_join(tmp_path) -> None:
    from twisted.internet.testing import MemoryReactorClock

    from ecr_twisted.app.supervisor import ChildListener, WorkerProcesses, decode_listeners

    class Spawning(MemoryReactorClock):
        def __init__(self) -> None:
            super().__init__()
            self.spawned: list[tuple[list[str], dict[int, object]]] = []

        def spawnProcess(self, proto, executable, args, env=None, path=None, uid=None, gid=None,
                         usePTY=False, childFDs=None):
            self.spawned.append((args, childFDs))

    reactor = Spawning()
    tcp = ChildListener(family=socket.AF_INET, address=("127.0.0.1", 5000), backlog=64)
    workers = WorkerProcesses(reactor, 3, ["--anonymous"], [tcp, ChildListener(fd=17)], str(tmp_path))
    workers.startService()
    assert len(reactor.spawned) == 2
    for args, fds in reactor.spawned:
        assert fds == {0: "w", 1: 1, 2: 2, 3: 17}  # only the unix socket's descriptor is passed
        listeners = decode_listeners(args[args.index("--listeners") + 1])
        assert listeners == (tcp, ChildListener(fd=3))
        assert args[args.index("--") + 1 :] == ["--anonymous"]


class _Keeper:
    def __init__(self) -> None:
        from twisted.internet.defer import Deferred

        self.first: Deferred[object] = Deferred()

    def first_token(self):
        return self.first

    def ready(self) -> bool:
        return self.first.called


def _child(tmp_path, shared):
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry
    from twisted.internet.protocol import Factory
    from twisted.internet.testing import MemoryReactorClock

    from ecr_twisted.app.build import ChildSockets, _serve_child
    from ecr_twisted.app.drain import Drain

    reactor = MemoryReactorClock()
    top = Drain(reactor)
    keeper = _Keeper()
    proxy = SimpleNamespace(keeper=keeper, registry=CollectorRegistry())
    child = ChildSockets((shared,), str(tmp_path / "metrics.sock"))
    _serve_child(reactor, reactor, top, proxy, child, [Factory()])  # type: ignore[arg-type]
    top.startService()
    return reactor, top, keeper


def test_a_child_makes_its_socket_only_once_it_holds_a_token_and_closes_it_on_drain(tmp_path) -> None:
    from ecr_twisted.app.supervisor import child_listener

    spec = "tcp:0:interface=127.0.0.1"
    main = bind_listener(spec, share=True)
    try:
        reactor, top, keeper = _child(tmp_path, child_listener(spec, main))
        # no socket yet: the kernel cannot hash a connection to a process that does not serve
        assert top.listeners == [] and reactor.adoptedPorts == []
        keeper.first.callback(object())
        [port] = top.listeners
        own = port.sock
        assert own.getsockname() == main.getsockname()
        assert own.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
        assert own.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        assert [fd for fd, _, _ in reactor.adoptedPorts] == [own.fileno()]
        top.stopService()  # the drain closes this process's own listener
        assert own.fileno() == -1
    finally:
        main.close()


def test_a_child_draining_before_its_token_never_listens(tmp_path) -> None:
    from ecr_twisted.app.supervisor import child_listener

    spec = "tcp:0:interface=127.0.0.1"
    main = bind_listener(spec, share=True)
    try:
        reactor, top, keeper = _child(tmp_path, child_listener(spec, main))
        top.stopService()
        keeper.first.callback(object())
        assert top.listeners == [] and reactor.adoptedPorts == []
    finally:
        main.close()


def test_a_child_that_cannot_listen_exits_for_the_main_process_to_restart_it(tmp_path) -> None:
    from ecr_twisted.app.supervisor import ChildListener

    with socket.socket() as taken:  # not shared: nobody may join it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        shared = ChildListener(family=socket.AF_INET, address=taken.getsockname(), backlog=8)
        reactor, top, keeper = _child(tmp_path, shared)
        keeper.first.callback(object())
        assert top.listeners == [] and reactor.hasStopped


def test_where_a_sibling_may_not_bind_the_socket_stays_exclusive_and_children_inherit_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import errno

    from ecr_twisted.app import supervisor

    made: list[socket.socket] = []

    class NoSiblings(socket.socket):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

        def bind(self, address) -> None:
            if len(made) > 1:  # the trial sibling
                raise OSError(errno.EADDRINUSE, "Address already in use")
            super().bind(address)

    monkeypatch.setattr(supervisor.socket, "socket", NoSiblings)
    spec = "tcp:0:interface=127.0.0.1"
    sock = bind_listener(spec, share=True)
    try:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0
        assert sock.get_inheritable()
        assert supervisor.child_listener(spec, sock).fd == sock.fileno()
    finally:
        sock.close()
