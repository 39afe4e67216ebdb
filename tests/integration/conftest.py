"""Fixtures for the integration tests: the emulated ECR and real ``twistd ecrproxy`` processes.

* ``ecr``: one EmulatedECR for the whole session (tests that break it get their own);
* ``ecr_prod`` / ``ecr_shared``: two emulated ECR registries of two accounts and regions on one moto
  (multi-registry tests): only credentials moto counts as account B (STS AssumeRole of
  ``ecr_shared.role_arn()``) get the token ``ecr_shared``'s registry accepts;
* ``proxy_factory``: start proxies with extra arguments, stopped after the test;
* ``module_proxy_factory``: the same, stopped after the module;
* ``proxy``: one default proxy (stream mode) per module on ``ecr``;
* ``dockerd`` / ``containerd``: one daemon each per session, started on first use (clients.py).

When a test fails, the tail of every proxy log still running is attached to its report, and
the daemons' logs when the test used them.
"""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Generator, Iterator

import pytest
from pluggy import Result

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from clients import DAEMONS_USED, LIVE_DAEMONS, Containerd, Dockerd  # noqa: E402
from proxy_harness import LIVE_PROXIES, Proxy, ProxyFactory  # noqa: E402

from ecr_twisted.testing.emulator import EmulatedECR  # noqa: E402


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Result[pytest.TestReport], None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed and LIVE_PROXIES:
        for p in list(LIVE_PROXIES):
            report.sections.append((f"{p.name} log tail ({p.log_path})", p.log_tail(8000)))
    if report.failed:
        daemons_used: set[str] = item.stash.get(DAEMONS_USED, set())
        used = set(getattr(item, "fixturenames", ())) | daemons_used
        for d in list(LIVE_DAEMONS):
            if d.name in used:
                report.sections.append((f"{d.name} log tail ({d.log_path})", d.log_tail(8000)))


@pytest.fixture(scope="session")
def ecr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatedECR]:
    """The shared emulated ECR. Tests that change its token must put it back."""
    with EmulatedECR(tmp_path_factory.mktemp("ecr")) as emu:
        yield emu


#: the two accounts of the multi-registry tests (and their regions: cross-account and cross-region at once)
PROD_ACCOUNT, PROD_REGION = "111111111111", "us-east-1"
SHARED_ACCOUNT, SHARED_REGION = "222222222222", "eu-west-1"


@pytest.fixture(scope="session")
def ecr_prod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatedECR]:
    """Account A's registry; its moto (account by access key) serves ``ecr_shared`` too. Put tokens back."""
    with EmulatedECR(tmp_path_factory.mktemp("ecr-prod"), account=PROD_ACCOUNT, region=PROD_REGION,
                     multi_account=True) as emu:
        yield emu


@pytest.fixture(scope="session")
def ecr_shared(ecr_prod: EmulatedECR, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatedECR]:
    """Account B's registry on ``ecr_prod``'s moto, with its own password, bucket and IAM key."""
    with EmulatedECR(tmp_path_factory.mktemp("ecr-shared"), account=SHARED_ACCOUNT, region=SHARED_REGION,
                     moto_of=ecr_prod) as emu:
        yield emu


@pytest.fixture
def proxy_factory(tmp_path: pathlib.Path) -> Iterator[ProxyFactory]:
    factory = ProxyFactory(tmp_path / "proxies")
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="module")
def module_proxy_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyFactory]:
    factory = ProxyFactory(tmp_path_factory.mktemp("proxies"))
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="module")
def proxy(ecr: EmulatedECR, module_proxy_factory: ProxyFactory) -> Proxy:
    """A stream-mode proxy on the shared emulator, relying on AWS_ENDPOINT_URL_ECR for the ECR API."""
    p = module_proxy_factory(ecr)
    assert "AWS_ENDPOINT_URL_ECR" in p.env and "--ecr-endpoint-url" not in p.args
    return p


@pytest.fixture(scope="session")
def dockerd() -> Iterator[Dockerd]:
    """One dockerd for the session (vfs, no networking, private data/exec root and socket)."""
    daemon = Dockerd()
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()
        daemon.remove()


@pytest.fixture(scope="session")
def containerd() -> Iterator[Containerd]:
    """One containerd for the session (private config, root, state and socket)."""
    daemon = Containerd()
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()
        daemon.remove()
