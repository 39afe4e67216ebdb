"""Graceful drain (issue #12) on MemoryReactorClock: idle connections close at once, requests in
flight finish, the deadline aborts the rest, readiness flips at once, listeners close after the delay."""

from typing import Any

from twisted.application import service
from twisted.internet.address import IPv4Address

from ecr_twisted.app.drain import Drain
from ecr_twisted.testing.doubles import ClosingTransport, Harness

DIGEST = b"sha256:" + b"cd" * 32
GET_BLOB = b"GET /v2/app/blobs/" + DIGEST + b" HTTP/1.1\r\nHost: x\r\n\r\n"


class Recorder(service.Service):
    def __init__(self, log: list[str], name: str) -> None:
        self.log = log
        self.label = name

    def stopService(self) -> Any:
        self.log.append(self.label)
        return super().stopService()


def setup(delay: float = 0.0, timeout: float = 30.0) -> tuple[Harness, Drain, list[str]]:
    h = Harness()
    stopped: list[str] = []
    drain = Drain(h.reactor, delay, timeout)
    drain.factories.append(h.factory)
    Recorder(stopped, "tokens").setServiceParent(drain)
    drain.add_listener(Recorder(stopped, "listener"))
    drain.startService()
    return h, drain, stopped


def ended(d: Any) -> list[bool]:
    """A list that holds True once `d` has fired (a chained Deferred says `called` too early)."""
    out: list[bool] = []
    d.addCallback(lambda _: out.append(True))
    return out


def connect(h: Harness) -> tuple[Any, ClosingTransport]:
    proto = h.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = ClosingTransport(h.reactor, proto, peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    proto.makeConnection(transport)
    return proto, transport


def start_download(h: Harness) -> tuple[Any, ClosingTransport, Any]:
    """A blob GET whose response head and first 4 of 10 bytes reached the client."""
    proto, client = connect(h)
    proto.dataReceived(GET_BLOB)
    up, _ = h.upstreams.last()
    up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabcd")
    assert client.value().endswith(b"abcd")
    return proto, client, up


def test_idle_connections_close_at_once_and_requests_in_flight_finish() -> None:
    h, drain, stopped = setup()
    _, idle = connect(h)
    _, busy, up = start_download(h)
    done = ended(drain.stopService())
    assert not drain.ready()
    assert idle.disconnecting and not busy.disconnecting
    assert stopped == ["listener"]  # no delay: listeners close at once, the rest waits
    h.reactor.advance(0)
    assert len(h.factory.connections) == 1 and not done
    h.reactor.advance(5)
    up.dataReceived(b"efghij")  # the rest of the body: the response is whole
    assert busy.value().endswith(b"abcdefghij")
    assert busy.disconnecting and not busy.disconnected  # closed after the response, not aborted
    h.reactor.advance(0)
    assert done and stopped == ["listener", "tokens"]
    h.close()


def test_a_kept_alive_connection_is_closed_after_its_response() -> None:
    h, drain, _ = setup()
    proto, client = connect(h)
    proto.dataReceived(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
    drain.stopService()
    up, _ = h.upstreams.last()
    up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
    assert client.value().endswith(b"{}") and client.disconnecting
    assert b"\r\nConnection: close\r\n" in client.value()
    h.close()


def test_the_deadline_aborts_what_is_left() -> None:
    h, drain, stopped = setup(timeout=2.0)
    _, busy, up = start_download(h)
    done = ended(drain.stopService())
    h.reactor.advance(1.9)
    assert not busy.disconnecting and not done
    h.reactor.advance(0.2)
    assert busy.disconnected  # aborted: the client sees a cut connection, never a short whole body
    assert not busy.value().endswith(b"abcdefghij")
    h.reactor.advance(0)
    assert done and stopped == ["listener", "tokens"]
    h.close()


def test_listeners_close_after_the_delay_while_not_ready() -> None:
    h, drain, stopped = setup(delay=5.0)
    _, idle = connect(h)
    done = ended(drain.stopService())
    assert not drain.ready()
    assert stopped == [] and not idle.disconnecting  # load balancers get time to see /readyz 503
    h.reactor.advance(5)
    assert idle.disconnecting
    h.reactor.advance(0)
    assert done and stopped == ["listener", "tokens"]
    h.close()


def test_a_drain_with_nothing_open_ends_at_once_and_leaves_no_timer() -> None:
    h, drain, stopped = setup()
    done = ended(drain.stopService())
    assert done and stopped == ["listener", "tokens"]
    assert drain._deadline is None  # the deadline timer is cancelled
    h.close()


def test_on_drain_hooks_are_waited_for_and_on_abort_told_at_the_deadline() -> None:
    from twisted.internet.defer import Deferred

    h, drain, stopped = setup(timeout=3.0)
    children: Deferred[None] = Deferred()
    aborted: list[bool] = []
    drain.on_drain.append(lambda: children)
    drain.on_abort.append(lambda: aborted.append(True))
    done = ended(drain.stopService())
    h.reactor.advance(3)
    assert aborted == [True] and not done  # the children are still draining
    children.callback(None)
    assert done and stopped == ["listener", "tokens"]
    h.close()


def test_readyz_answers_503_while_draining() -> None:
    from prometheus_client import CollectorRegistry
    from twisted.web.test.requesthelper import DummyRequest

    from ecr_twisted.observe.health import ops_site

    h = Harness(metrics_port="tcp:9100")
    top = h.built.top
    assert isinstance(top, Drain) and top.factories == [h.factory]  # build wires the drain
    site = ops_site(CollectorRegistry(), top.ready, draining=lambda: top.draining)

    def readyz() -> tuple[int, bytes]:
        request = DummyRequest([b"readyz"])
        body = site.getResourceFor(request).render(request)
        return request.responseCode or 200, body

    assert readyz() == (200, b"ready\n")
    top.draining = True
    assert readyz() == (503, b"not ready: draining (the process is stopping)\n")
    h.close()


def test_worker_processes_drain_signals_children_once_and_restarts_none() -> None:
    from twisted.internet.task import Clock

    from ecr_twisted.app.supervisor import WorkerProcesses, _Child

    class FakeProcess:
        def __init__(self) -> None:
            self.signals: list[str] = []
            self.stdin_closed = False

        def signalProcess(self, name: str) -> None:
            self.signals.append(name)

        def closeStdin(self) -> None:
            self.stdin_closed = True

    clock = Clock()
    workers = WorkerProcesses(clock, 2, [], [], "/nonexistent")
    workers.running = True
    child = _Child(workers, 1)
    process = FakeProcess()
    child.transport = process  # type: ignore[assignment]
    workers.children[1] = child
    done = ended(workers.drain())
    # SIGTERM only: closing the child's stdin as well made it call reactor.stop twice (ReactorNotRunning)
    assert process.signals == ["TERM"] and not process.stdin_closed and not done
    workers.abort()  # the deadline: a second SIGTERM ends the child's drain at once
    assert process.signals == ["TERM", "TERM"]
    child.processEnded(None)
    assert done and clock.getDelayedCalls() == []  # not restarted


def test_drain_options() -> None:
    import pytest
    from twisted.python.usage import UsageError

    from ecr_twisted.app.options import Options

    base = ["--anonymous", "--region", "eu-west-1"]
    o = Options(environ={})
    o.parseOptions(base)
    assert (o.settings.drain_delay, o.settings.drain_timeout) == (0.0, 30.0)
    o = Options(environ={"ECRPROXY_DRAIN_TIMEOUT": "5"})
    o.parseOptions([*base, "--drain-delay", "2.5"])
    assert (o.settings.drain_delay, o.settings.drain_timeout) == (2.5, 5.0)
    for bad in (["--drain-timeout", "-1"], ["--drain-delay", "-0.5"]):
        with pytest.raises(UsageError, match=bad[0]):
            Options(environ={}).parseOptions([*base, *bad])
    with pytest.raises(UsageError):
        Options(environ={}).parseOptions([*base, "--drain-delay", "soon"])
