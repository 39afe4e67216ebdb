"""Starting: one-line usage errors naming the option, --version, AWS_REGION, unknown ECRPROXY_* variables,
the startup line, and nothing left behind by a failed start (issue #12)."""

from __future__ import annotations

import glob
import os
import tempfile
from typing import Any, cast

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.python.usage import UsageError

import ecr_twisted
from ecr_twisted.app.build import build, describe
from ecr_twisted.app.options import Options, unknown_env

BASE = ["--anonymous", "--region", "eu-west-1"]


def parse(args: list[str], env: dict[str, str] | None = None) -> Options:
    o = Options(environ=env or {})
    o.parseOptions(args)
    return o


@pytest.mark.parametrize(
    "args,env,message",
    [
        (["--upstream-timeout", "abc"], {}, "--upstream-timeout: 'abc' is not a number"),
        (["--upload-timeout", "x"], {}, "--upload-timeout: 'x' is not a number"),
        (["--idle-timeout", "1s"], {}, "--idle-timeout: '1s' is not a number"),
        (["--head-timeout", ""], {}, "--head-timeout: '' is not a number"),
        (["--workers", "two"], {}, "--workers: 'two' is not a whole number"),
        (["--upstream-connections", "1.5"], {}, "--upstream-connections: '1.5' is not a whole number"),
        (["--max-connections", "lots"], {}, "--max-connections: 'lots' is not a whole number"),
        (["--min-body-rate", "fast"], {}, "--min-body-rate: 'fast' is not a whole number"),
        (["--token-ttl", "5m"], {}, "--token-ttl: '5m' is not a whole number"),
        (["--tag-ttl", "a"], {}, "--tag-ttl: 'a' is not a number"),
        (["--auth-webhook-ttl", "a"], {}, "--auth-webhook-ttl: 'a' is not a number"),
        ([], {"ECRPROXY_UPSTREAM_TIMEOUT": "abc"}, "ECRPROXY_UPSTREAM_TIMEOUT: 'abc' is not a number"),
        ([], {"ECRPROXY_WORKERS": "x"}, "ECRPROXY_WORKERS: 'x' is not a whole number"),
        ([], {"ECRPROXY_READ_ONLY": "maybe"}, "ECRPROXY_READ_ONLY: expected true or false"),
        (["--workers", "0"], {}, "--workers must be between 1 and 64"),
        (["--blob-mode", "copy"], {}, "--blob-mode must be stream or redirect"),
    ],
)
def test_usage_errors_are_one_line_naming_the_option(args: list[str], env: dict[str, str], message: str) -> None:
    with pytest.raises(UsageError) as e:
        parse(BASE + args, env)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


class _Twistd:
    """Stands for twistd's ServerOptions: a parent makes the ecrproxy Options report errors itself."""

    subCommand = "ecrproxy"

    def getSynopsis(self) -> str:
        return "twistd"


def test_under_twistd_a_usage_error_is_one_line_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    o = Options(environ={})
    o.parent = _Twistd()  # type: ignore[assignment]
    with pytest.raises(SystemExit) as e:
        o.parseOptions(BASE + ["--upstream-timeout", "abc"])
    assert e.value.code == 1
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err == "twistd ecrproxy: --upstream-timeout: 'abc' is not a number (see --help)\n"


def test_version_prints_ecr_twisted_and_twisted(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        parse(["--version"])
    assert e.value.code == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"ecr-twisted {ecr_twisted.__version__} (Twisted ")


@pytest.mark.parametrize(
    "env,region",
    [
        ({"AWS_REGION": "ap-south-1"}, "ap-south-1"),
        ({"AWS_DEFAULT_REGION": "us-west-2"}, "us-west-2"),
        ({"AWS_REGION": "ap-south-1", "AWS_DEFAULT_REGION": "us-west-2"}, "ap-south-1"),
        ({"AWS_REGION": "ap-south-1", "ECRPROXY_REGION": "eu-north-1"}, "eu-north-1"),
    ],
)
def test_region_from_the_aws_environment(env: dict[str, str], region: str) -> None:
    assert parse(["--anonymous"], env).settings.region == region


def test_command_line_region_wins_over_aws_region() -> None:
    assert parse(BASE, {"AWS_REGION": "ap-south-1"}).settings.region == "eu-west-1"


def test_unknown_variables_are_named_with_the_closest_known_one() -> None:
    env = {"ECRPROXY_UPSTREAM_TIMOUT": "5", "ECRPROXY_ZZZ": "1", "ECRPROXY_REGION": "eu-west-1", "OTHER": "x"}
    assert unknown_env(env) == ["ECRPROXY_UPSTREAM_TIMOUT (did you mean ECRPROXY_UPSTREAM_TIMEOUT?)", "ECRPROXY_ZZZ"]
    assert parse(["--anonymous"], env).unknown_env == unknown_env(env)


def _logged(run: Any) -> list[str]:
    from twisted.logger import formatEvent

    events: list[dict[str, Any]] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        run()
    finally:
        globalLogPublisher.removeObserver(observer)
    return [formatEvent(e) for e in events]


def test_make_service_warns_about_unknown_variables() -> None:
    from ecr_twisted.app.options import makeService

    o = parse(BASE, {"ECRPROXY_UPSTREAM_TIMOUT": "5"})
    lines = _logged(lambda: makeService(o, MemoryReactorClock()))
    assert [line for line in lines if "ECRPROXY_UPSTREAM_TIMOUT" in line] == [
        "unknown variables ignored: ECRPROXY_UPSTREAM_TIMOUT (did you mean ECRPROXY_UPSTREAM_TIMEOUT?)"
    ]


def test_startup_line_says_what_is_served_without_secrets(tmp_path: Any) -> None:
    import bcrypt

    htpasswd = tmp_path / "users"
    htpasswd.write_bytes(b"alice:" + bcrypt.hashpw(b"sekrit-password", bcrypt.gensalt(4)) + b"\n")
    key = tmp_path / "token.key"
    key.write_bytes(b"k" * 40)
    o = parse([
        "--auth", "token", "--htpasswd", str(htpasswd), "--token-key", str(key), "--region", "eu-west-1",
        "--upstream", "https://registry.example.com", "--workers", "1", "--policy", "public-read",
    ])
    lines = _logged(lambda: build(o.settings, MemoryReactorClock()))
    [line] = [line for line in lines if line.startswith("ecr-twisted ")]
    assert line == describe(o.settings)
    for needle in (
        ecr_twisted.__version__, "auth=token", "policy=public-read", "upstream=https://registry.example.com",
        "region=eu-west-1", "workers=1", "cache=off", f"htpasswd={htpasswd}",
    ):
        assert needle in line, line
    assert "sekrit" not in line and "kkkk" not in line and "$2b$" not in line


def _key_dirs() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "ecrproxy-key-*")))


def test_failed_build_leaves_no_token_key_directory(tmp_path: Any) -> None:
    import bcrypt

    htpasswd = tmp_path / "users"
    htpasswd.write_bytes(b"alice:" + bcrypt.hashpw(b"pw", bcrypt.gensalt(4)) + b"\n")
    o = parse(["--auth", "token", "--htpasswd", str(htpasswd), "--region", "eu-west-1"])
    before = _key_dirs()
    assert _key_dirs() == before  # parsing made none
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    from dataclasses import replace

    with pytest.raises(UsageError, match="--cache-dir"):
        build(replace(o.settings, cache_dir=str(blocked / "cache")), MemoryReactorClock())
    assert _key_dirs() == before


def test_token_key_directory_removed_at_shutdown(tmp_path: Any) -> None:
    import bcrypt

    htpasswd = tmp_path / "users"
    htpasswd.write_bytes(b"alice:" + bcrypt.hashpw(b"pw", bcrypt.gensalt(4)) + b"\n")
    o = parse(["--auth", "token", "--htpasswd", str(htpasswd), "--region", "eu-west-1"])
    reactor = MemoryReactorClock()
    built = build(o.settings, reactor)
    keydir = os.path.dirname(str(built.settings.token_key))
    assert os.path.isdir(keydir)
    for f, args, kwargs in reactor.triggers["after"]["shutdown"]:
        f(*args, **kwargs)
    assert not os.path.exists(keydir)
