"""The ECR API children (fetch_token, list_repositories) in-process against moto and botocore's Stubber:
default chain, named profile, assumed role into another account, expiry, pagination, error codes."""

from __future__ import annotations

import base64
import datetime
import io
import json
from pathlib import Path
from typing import Any, Iterator

import botocore.session
import pytest
from botocore.stub import Stubber
from moto import mock_aws

from ecr_twisted.ecr import fetch_token, list_repositories
from ecr_twisted.ecr.aws import EXTERNAL_ID_ENV, AwsAccess, error_code, fail, make_client_maker

REGION = "eu-west-1"
HOME = "123456789012"  # moto's account for unknown keys
OTHER = "222222222222"
ROLE = f"arn:aws:iam::{OTHER}:role/ecr-reader"


@pytest.fixture
def aws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """moto, with a default chain of fixed keys and no ~/.aws: the test writes its own files."""
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION", EXTERNAL_ID_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    with mock_aws():
        yield tmp_path


def run(main: Any, argv: list[str], capsys: pytest.CaptureFixture[str], **kw: Any) -> tuple[int, Any, str]:
    status = main(argv, **kw)
    out, err = capsys.readouterr()
    return status, json.loads(out), err


def other_account_client(service: str = "ecr", region: str = REGION) -> Any:
    """A client acting in OTHER with role credentials, to set the other account up."""
    session = botocore.session.get_session()
    creds = session.create_client("sts", region_name=REGION).assume_role(
        RoleArn=ROLE, RoleSessionName="setup"
    )["Credentials"]
    return session.create_client(
        service, region_name=region, aws_access_key_id=creds["AccessKeyId"],
        aws_secret_access_key=creds["SecretAccessKey"], aws_session_token=creds["SessionToken"],
    )


def test_default_chain_token(aws: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, answer, err = run(fetch_token.main, ["--region", REGION, "--registry-id", HOME], capsys)
    assert status == 0 and err == ""
    assert answer["proxyEndpoint"] == f"https://{HOME}.dkr.ecr.{REGION}.amazonaws.com"
    assert base64.b64decode(answer["authorizationToken"]).startswith(b"AWS:")
    assert answer["credentialsExpireAt"] is None and answer["expiresAt"] == answer["tokenExpiresAt"]


def test_assumed_role_reaches_the_other_accounts_registry(aws: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = other_account_client()
    other.create_repository(repositoryName="shared/base")
    other.create_repository(repositoryName="shared/tools")
    botocore.session.get_session().create_client("ecr", region_name=REGION).create_repository(repositoryName="mine")
    argv = ["--region", REGION, "--registry-id", OTHER, "--role-arn", ROLE]
    status, answer, _ = run(fetch_token.main, argv, capsys)
    assert status == 0
    assert answer["proxyEndpoint"] == f"https://{OTHER}.dkr.ecr.{REGION}.amazonaws.com"
    assert base64.b64decode(answer["authorizationToken"]).startswith(f"AWS:{OTHER}".encode())
    assert answer["credentialsExpireAt"] is not None  # the role's: reported ...
    assert answer["expiresAt"] == min(answer["tokenExpiresAt"], answer["credentialsExpireAt"])  # ... and heeded
    status, names, _ = run(list_repositories.main, argv, capsys)
    assert status == 0 and names == ["shared/base", "shared/tools"]  # the other account's, not "mine"
    status, names, _ = run(list_repositories.main, ["--region", REGION, "--registry-id", HOME], capsys)
    assert names == ["mine"]


def test_named_profile_gives_credentials_and_region(
    aws: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_DEFAULT_REGION")  # it would win over the profile's region, as botocore says
    # the profile's keys are role credentials of OTHER (moto knows their account), its region another one
    creds = botocore.session.get_session().create_client("sts", region_name=REGION).assume_role(
        RoleArn=ROLE, RoleSessionName="profile"
    )["Credentials"]
    (aws / "credentials").write_text(
        f"[prod]\naws_access_key_id = {creds['AccessKeyId']}\naws_secret_access_key = {creds['SecretAccessKey']}\n"
        f"aws_session_token = {creds['SessionToken']}\n"
    )
    (aws / "config").write_text("[profile prod]\nregion = eu-central-1\n")
    other_account_client(region="eu-central-1").create_repository(repositoryName="from-profile")
    status, answer, _ = run(fetch_token.main, ["--profile", "prod"], capsys)
    assert status == 0 and answer["proxyEndpoint"] == f"https://{OTHER}.dkr.ecr.eu-central-1.amazonaws.com"
    status, names, _ = run(list_repositories.main, ["--profile", "prod"], capsys)
    assert names == ["from-profile"]
    # the default chain: not the profile's account
    status, names, _ = run(list_repositories.main, ["--region", "eu-central-1"], capsys)
    assert names == []


def test_an_unknown_profile_is_one_line_and_a_code(aws: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, answer, err = run(fetch_token.main, ["--profile", "nope", "--region", REGION], capsys)
    assert status == 1 and answer["error"] == "ProfileNotFound"
    assert err.count("\n") == 1 and "nope" in err


def test_listing_reads_every_repository(aws: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ecr = botocore.session.get_session().create_client("ecr", region_name=REGION)
    for i in range(120):
        ecr.create_repository(repositoryName=f"team/r{119 - i:03d}")
    status, names, _ = run(list_repositories.main, ["--region", REGION, "--page-size", "50"], capsys)
    assert status == 0 and names == [f"team/r{i:03d}" for i in range(120)]


# ---------------------------------------------------------------- fakes and stubs


class FakeSession:
    """Records the clients made; answers from stubbed botocore clients or canned objects."""

    def __init__(self, clients: dict[str, Any]) -> None:
        self.clients = clients
        self.made: list[tuple[str, dict[str, Any]]] = []

    def create_client(self, service: str, **kw: Any) -> Any:
        self.made.append((service, kw))
        return self.clients[service]


def stubbed(service: str) -> tuple[Any, Stubber]:
    client = botocore.session.get_session().create_client(
        service, region_name=REGION, aws_access_key_id="k", aws_secret_access_key="s"
    )
    return client, Stubber(client)


def at(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc)


TOKEN = base64.b64encode(b"AWS:" + b"x" * 100).decode()


def role_setup(token_expires: float, creds_expire: float) -> tuple[FakeSession, list[Any]]:
    sts, sts_stub = stubbed("sts")
    sts_stub.add_response(
        "assume_role",
        {"Credentials": {"AccessKeyId": "ASIAROLEKEY0000000000", "SecretAccessKey": "rolesecret",
                         "SessionToken": "rolesession", "Expiration": at(creds_expire)}},
        {"RoleArn": ROLE, "RoleSessionName": "ecr-twisted", "ExternalId": "ext-1234"},
    )
    ecr, ecr_stub = stubbed("ecr")
    ecr_stub.add_response(
        "get_authorization_token",
        {"authorizationData": [{"authorizationToken": TOKEN, "expiresAt": at(token_expires),
                                "proxyEndpoint": f"https://{OTHER}.dkr.ecr.{REGION}.amazonaws.com"}]},
        {"registryIds": [OTHER]},
    )
    sts_stub.activate()
    ecr_stub.activate()
    return FakeSession({"sts": sts, "ecr": ecr}), [sts_stub, ecr_stub]


def test_role_credentials_expiring_first_set_the_expiry(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    session, stubs = role_setup(token_expires=50_000.0, creds_expire=3_600.0)
    profiles: list[str | None] = []

    def factory(profile: str | None) -> FakeSession:
        profiles.append(profile)
        return session

    monkeypatch.setenv(EXTERNAL_ID_ENV, "ext-1234")  # the external ID never comes through argv
    argv = ["--region", REGION, "--registry-id", OTHER, "--role-arn", ROLE, "--profile", "base",
            "--sts-endpoint-url", "http://sts.test", "--ecr-endpoint-url", "http://ecr.test"]
    status, answer, _ = run(fetch_token.main, argv, capsys, session_factory=factory)
    assert status == 0, answer
    assert answer == {"authorizationToken": TOKEN, "expiresAt": 3_600.0, "tokenExpiresAt": 50_000.0,
                      "credentialsExpireAt": 3_600.0,
                      "proxyEndpoint": f"https://{OTHER}.dkr.ecr.{REGION}.amazonaws.com"}
    assert profiles == ["base"]  # the profile is the role's base
    assert session.made == [
        ("sts", {"region_name": REGION, "endpoint_url": "http://sts.test"}),
        ("ecr", {"region_name": REGION, "aws_access_key_id": "ASIAROLEKEY0000000000",
                 "aws_secret_access_key": "rolesecret", "aws_session_token": "rolesession",
                 "endpoint_url": "http://ecr.test"}),
    ]
    for stub in stubs:
        stub.assert_no_pending_responses()


def test_a_token_expiring_first_keeps_its_expiry(capsys: pytest.CaptureFixture[str]) -> None:
    session, _ = role_setup(token_expires=3_000.0, creds_expire=3_600.0)
    maker = make_client_maker(
        AwsAccess(region=REGION, registry_id=OTHER, role_arn=ROLE, external_id="ext-1234"), lambda p: session
    )
    answer = fetch_token.answer(maker)
    assert answer["expiresAt"] == 3_000.0 and answer["credentialsExpireAt"] == 3_600.0


def test_the_session_name_is_passed() -> None:
    sts, stub = stubbed("sts")
    stub.add_response(
        "assume_role",
        {"Credentials": {"AccessKeyId": "ASIAROLEKEY0000000000", "SecretAccessKey": "s", "SessionToken": "t",
                         "Expiration": at(10.0)}},
        {"RoleArn": ROLE, "RoleSessionName": "ci-runner"},  # no ExternalId when none is given
    )
    stub.activate()
    session = FakeSession({"sts": sts, "ecr": object()})
    make_client_maker(AwsAccess(role_arn=ROLE, session_name="ci-runner"), lambda p: session).ecr()
    stub.assert_no_pending_responses()
    assert session.made[0] == ("sts", {})  # no region, no endpoint: botocore's own defaults


def test_listing_follows_every_page_of_the_given_registry() -> None:
    ecr, stub = stubbed("ecr")
    stub.add_response("describe_repositories",
                      {"repositories": [{"repositoryName": "bb"}, {"repositoryName": "aa"}], "nextToken": "t1"},
                      {"registryId": OTHER, "maxResults": 2})
    stub.add_response("describe_repositories", {"repositories": [{"repositoryName": "cc"}]},
                      {"registryId": OTHER, "maxResults": 2, "nextToken": "t1"})
    stub.activate()
    maker = make_client_maker(AwsAccess(registry_id=OTHER), lambda p: FakeSession({"ecr": ecr}))
    assert list_repositories.repository_names(maker, page_size=2) == ["aa", "bb", "cc"]
    stub.assert_no_pending_responses()


@pytest.mark.parametrize(
    "code", ["AccessDeniedException", "AccessDenied", "UnauthorizedOperation", "ThrottlingException"]
)
def test_an_aws_error_is_told_by_its_code(code: str, capsys: pytest.CaptureFixture[str]) -> None:
    ecr, stub = stubbed("ecr")
    stub.add_client_error("describe_repositories", service_error_code=code, service_message="not for you",
                          http_status_code=400)
    stub.activate()
    status, answer, err = run(list_repositories.main, ["--region", REGION], capsys,
                              session_factory=lambda p: FakeSession({"ecr": ecr}))
    assert status == 1 and answer["error"] == code
    assert err.count("\n") == 1 and code in err and "not for you" in err
    assert answer["message"] == err.strip()


def test_error_code_and_fail_for_non_aws_errors() -> None:
    assert error_code(ValueError("x")) == "ValueError"
    out, err = io.StringIO(), io.StringIO()
    assert fail(RuntimeError("line one\nline two"), out, err) == 1
    assert err.getvalue() == "RuntimeError: line one line two\n"
    assert json.loads(out.getvalue()) == {"error": "RuntimeError", "message": "RuntimeError: line one line two"}
    out, err = io.StringIO(), io.StringIO()
    fail(OSError('Failed to connect to proxy URL: "http://robot:pr0xy-pw@egress:3128" via https://u@x/'), out, err)
    assert "pr0xy-pw" not in out.getvalue() + err.getvalue() and "robot" not in err.getvalue()
    assert 'URL: "http://***@egress:3128" via https://***@x/' in err.getvalue()


def test_the_old_entry_point_still_answers(aws: Path) -> None:
    data = fetch_token.fetch_authorization_data(REGION, HOME)
    assert data["proxyEndpoint"] == f"https://{HOME}.dkr.ecr.{REGION}.amazonaws.com"


@pytest.mark.parametrize("module", ["ecr_twisted.ecr.fetch_token", "ecr_twisted.ecr.list_repositories"])
def test_the_children_run_as_modules(module: str, tmp_path: Path) -> None:
    """The real entry points, as the proxy runs them: an unknown profile fails before any network call."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(root), "AWS_CONFIG_FILE": str(tmp_path / "c"),
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "k")}
    done = subprocess.run([sys.executable, "-m", module, "--profile", "absent", "--region", REGION],
                          capture_output=True, env=env, cwd=root, timeout=60)
    assert done.returncode == 1
    assert json.loads(done.stdout)["error"] == "ProfileNotFound"
    assert done.stderr.decode().count("\n") == 1 and b"absent" in done.stderr


def test_both_children_share_one_main(capsys: pytest.CaptureFixture[str]) -> None:
    """`aws.child_main`: the shared options and any more, the answer as JSON, a failure as `fail` tells it."""
    from ecr_twisted.ecr.aws import child_main

    seen: list[Any] = []

    def answer(maker: Any, args: Any) -> Any:
        seen.append((maker.access.region, maker.access.registry_id, args.extra))
        return {"ok": [1, 2]}

    def more(parser: Any) -> None:
        parser.add_argument("--extra", type=int)

    status = child_main("prog", ["--region", REGION, "--registry-id", HOME, "--extra", "3"], None, answer, more)
    out, err = capsys.readouterr()
    assert (status, json.loads(out), err, seen) == (0, {"ok": [1, 2]}, "", [(REGION, HOME, 3)])

    def broken(maker: Any, args: Any) -> Any:
        raise ValueError("no way\nat all")

    status = child_main("prog", [], None, broken)
    out, err = capsys.readouterr()
    assert (status, json.loads(out), err) == (1, {"error": "ValueError", "message": "ValueError: no way at all"},
                                              "ValueError: no way at all\n")
