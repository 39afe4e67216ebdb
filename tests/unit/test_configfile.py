"""The --config file: precedence under the command line and ECRPROXY_*, upstream tables, and one
message naming the file, the line and the key for every way a file can be wrong."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
from twisted.python.usage import UsageError

from ecr_twisted.app import configfile
from ecr_twisted.app.options import Options
from ecr_twisted.testing.doubles import write_htpasswd
from ecr_twisted.upstreams.spec import UpstreamSpec

README = Path(__file__).resolve().parents[2] / "README.md"
ENV = {"AWS_REGION": "eu-central-1"}  # the "default" level of --region, without botocore's own config


def load(tmp_path: Path, text: str, args: list[str] | None = None, env: dict[str, str] | None = None,
         name: str = "ecrproxy.toml") -> Options:
    path = tmp_path / name
    path.write_text(text)
    o = Options(environ={**ENV, **(env or {})})
    o.parseOptions(["--config", str(path), *(args or [])])
    return o


def error(tmp_path: Path, text: str, args: list[str] | None = None, env: dict[str, str] | None = None) -> str:
    with pytest.raises(UsageError) as e:
        load(tmp_path, text, args, env)
    return str(e.value)


# --- precedence: command line, then ECRPROXY_*, then the file, then the defaults ---

PRECEDENCE = [
    # option, file value (TOML), environment value, command-line value, settings field,
    # expected (file, env, cli), default
    ("region", '"us-west-2"', "ap-south-1", "sa-east-1", "region", ("us-west-2", "ap-south-1", "sa-east-1"),
     "eu-central-1"),
    ("blob-mode", '"redirect"', "stream", "redirect", "blob_mode", ("redirect", "stream", "redirect"), "stream"),
    ("workers", "3", "2", "4", "workers", (3, 2, 4), 1),
    ("upstream-wait", "7", "8.5", "9", "upstream_wait", (7.0, 8.5, 9.0), 5.0),
    ("catalog-ttl", "0", "12", "13.5", "catalog_ttl", (0.0, 12.0, 13.5), 30.0),
    ("port", '["6000", 6001]', "7000", "8000", "ports", (("6000", "6001"), ("7000",), ("8000",)), ("5000",)),
    ("metrics-port", "9100", "tcp:9200", "tcp:9300", "metrics_port", ("9100", "tcp:9200", "tcp:9300"), None),
    ("egress-proxy", '"http://a.example:3128"', "http://b.example:3128", "http://c.example:3128", "egress_proxy",
     ("http://a.example:3128", "http://b.example:3128", "http://c.example:3128"), None),
    ("public-url", '"https://f.example"', "https://e.example", "https://c.example", "public_url",
     ("https://f.example", "https://e.example", "https://c.example"), None),
]


@pytest.mark.parametrize("option,in_file,in_env,on_cli,field,expected,default", PRECEDENCE,
                         ids=[p[0] for p in PRECEDENCE])
def test_each_level_wins_over_the_next(
    tmp_path: Path, option: str, in_file: str, in_env: str, on_cli: str, field: str, expected: tuple[Any, ...],
    default: Any,
) -> None:
    env_name = "ECRPROXY_" + option.upper().replace("-", "_")
    base = 'auth = "none"\n'
    assert getattr(load(tmp_path, base).settings, field) == default
    assert getattr(load(tmp_path, base + f"{option} = {in_file}\n").settings, field) == expected[0]
    assert getattr(load(tmp_path, base + f"{option} = {in_file}\n", env={env_name: in_env}).settings,
                   field) == expected[1]
    assert getattr(load(tmp_path, base + f"{option} = {in_file}\n", [f"--{option}", on_cli],
                        env={env_name: in_env}).settings, field) == expected[2]


def test_flags_a_false_environment_beats_a_true_file_and_the_command_line_beats_both(tmp_path: Path) -> None:
    text = 'auth = "none"\nread-only = true\ntrust-forwarded = false\n'
    assert load(tmp_path, text).settings.read_only is True
    assert load(tmp_path, text).settings.trust_forwarded is False
    assert load(tmp_path, text, env={"ECRPROXY_READ_ONLY": "false"}).settings.read_only is False
    assert load(tmp_path, text, ["--trust-forwarded"]).settings.trust_forwarded is True


def test_the_file_is_named_by_the_environment_too_and_the_command_line_names_it_first(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text('auth = "none"\nblob-mode = "redirect"\n')
    (tmp_path / "b.toml").write_text('auth = "none"\nblob-mode = "stream"\nread-only = true\n')
    o = Options(environ={**ENV, "ECRPROXY_CONFIG": str(tmp_path / "a.toml")})
    o.parseOptions([])
    assert o.settings.blob_mode == "redirect" and o.settings.config_file == str(tmp_path / "a.toml")
    o = Options(environ={**ENV, "ECRPROXY_CONFIG": str(tmp_path / "a.toml")})
    o.parseOptions(["--config", str(tmp_path / "b.toml")])
    assert o.settings.blob_mode == "stream" and o.settings.read_only


def test_config_file_is_absolute_in_the_settings_and_workers_children_read_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "c.toml").write_text(
        'auth = "none"\nworkers = 2\n[[upstream]]\nname = "a"\nregistry-id = "111111111111"\ndefault = true\n'
    )
    monkeypatch.chdir(tmp_path)
    parent = Options(environ=ENV)
    parent.parseOptions(["--config", "c.toml", "--port", "tcp:0"])
    assert parent.settings.config_file == str(tmp_path / "c.toml")
    assert parent.settings.argv == ("--config", "c.toml", "--port", "tcp:0")
    # a --workers child: the same arguments (app/worker.py), the same environment and directory
    child = Options(environ=ENV)
    child.parseOptions(list(parent.settings.argv))
    assert child.settings == parent.settings
    assert child.settings.upstreams[0].registry_id == "111111111111"


def test_relative_paths_in_the_file_are_taken_from_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    write_htpasswd(str(etc / "htpasswd"), {"alice": "pw"})
    (etc / "pw").write_text("s3cret\n")
    (etc / "c.toml").write_text(
        'auth = "basic"\nhtpasswd = "htpasswd"\npolicy = "private"\nregion = "eu-west-1"\n'
        '[[upstream]]\nname = "m"\nurl = "https://m.example"\nusername = "u"\npassword-file = "pw"\nprefix = "m"\n'
    )
    monkeypatch.chdir(tmp_path)
    o = Options(environ={})
    o.parseOptions(["--config", "etc/c.toml"])
    assert o.settings.htpasswd == os.path.join("etc", "htpasswd")
    assert o.settings.policy == "private"  # a preset stays a preset
    assert o.settings.upstreams[0].password == "s3cret"


def test_proxy_environment_is_kept_for_the_egress_legs(tmp_path: Path) -> None:
    env = {"HTTPS_PROXY": "http://p:3128", "no_proxy": "169.254.169.254", "HTTP_PROXY": "", "OTHER": "x"}
    o = load(tmp_path, 'auth = "none"\n', env=env)
    # HTTP_PROXY set to nothing is kept: an empty lower-case one would override an upper-case one
    assert o.settings.proxy_env == (
        ("HTTPS_PROXY", "http://p:3128"), ("HTTP_PROXY", ""), ("no_proxy", "169.254.169.254"))
    assert o.settings.egress_proxy is None


# --- upstream tables ---

TWO = '''auth = "none"
region = "eu-west-1"

[[upstream]]
name = "prod"
registry-id = "111111111111"
prefix = "prod"

[[upstream]]
name = "staging"
region = "us-east-2"
credentials = "profile"
profile = "staging"
hosts = ["Staging.Registry.Example.com"]
optional = true
'''


def test_upstream_tables_become_specs(tmp_path: Path) -> None:
    s = load(tmp_path, TWO).settings
    assert s.upstreams == (
        UpstreamSpec("prod", "ecr", registry_id="111111111111", region="eu-west-1", prefix="prod"),
        UpstreamSpec("staging", "ecr", region="us-east-2", credentials="profile", profile="staging",
                     hosts=("staging.registry.example.com",), optional=True),
    )
    assert s.registry_id is None and s.upstream is None
    assert load(tmp_path, 'auth = "none"\nregion = "eu-west-1"\n').settings.upstreams == ()


def test_credentials_follow_from_the_keys_given(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("  pa55  \n")
    text = '''auth = "none"
region = "eu-west-1"
[[upstream]]
name = "a"
kind = "ecr"
default = true
[[upstream]]
name = "b"
registry-id = "222222222222"
role-arn = "arn:aws-cn:iam::222222222222:role/path/pull"
profile = "base"
prefix = "b"
[[upstream]]
name = "c"
url = "https://c.example"
username = "u"
password-file = "pw"
prefix = "c"
[[upstream]]
name = "d"
url = "http://d.example:5000"
prefix = "d/e"
'''
    a, b, c, d = load(tmp_path, text).settings.upstreams
    assert (a.kind, a.credentials, a.region, a.default) == ("ecr", "default", "eu-west-1", True)
    assert (b.credentials, b.profile, b.role_arn) == ("role", "base", "arn:aws-cn:iam::222222222222:role/path/pull")
    assert (c.kind, c.credentials, c.username, c.password) == ("registry", "static", "u", "pa55")
    assert "pa55" not in repr(c)
    assert (d.kind, d.credentials, d.namespace) == ("registry", "none", "d/e")


def test_without_the_global_region_ecr_upstreams_give_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ecr_twisted.app import options

    monkeypatch.setattr(options, "_botocore_region", lambda: None)
    text = '''auth = "none"
[[upstream]]
name = "m"
url = "https://m.example"
prefix = "m"
[[upstream]]
name = "a"
region = "ap-northeast-1"
default = true
'''
    path = tmp_path / "c.toml"
    path.write_text(text)
    o = Options(environ={})
    o.parseOptions(["--config", str(path)])
    assert o.settings.region == "ap-northeast-1"
    path.write_text(text + '[[upstream]]\nname = "b"\nkind = "ecr"\nprefix = "b"\n')
    with pytest.raises(UsageError) as e:
        Options(environ={}).parseOptions(["--config", str(path)])
    assert str(e.value) == (
        f'--config {path} line 10: upstream "b": needs key "region" (there is no --region to default to)')


def test_passthrough_is_refused_with_upstream_tables(tmp_path: Path) -> None:
    message = error(tmp_path, TWO.replace('auth = "none"', 'auth = "passthrough"'))
    assert message.startswith(f'--config {tmp_path}/ecrproxy.toml line 1: key "auth": --auth passthrough cannot serve')
    assert "must never be sent to another upstream" in message
    message = error(tmp_path, TWO.replace('auth = "none"\n', ""), ["--auth", "passthrough"])
    assert message.startswith("--auth passthrough cannot serve [[upstream]] tables")


@pytest.mark.parametrize("option,value", [("registry-id", "123456789012"), ("upstream", "https://r.example"),
                                          ("ecr-endpoint-url", "http://127.0.0.1:5001")])
def test_single_registry_options_are_refused_with_tables(tmp_path: Path, option: str, value: str) -> None:
    message = error(tmp_path, TWO, [f"--{option}", value])
    assert message == (f"--{option} describes the one registry of a proxy without [[upstream]] tables: with them, "
                       f"put it in an [[upstream]] table of --config {tmp_path}/ecrproxy.toml")
    env = {"ECRPROXY_" + option.upper().replace("-", "_"): value}
    assert error(tmp_path, TWO, env=env) == message
    if option != "upstream":  # upstream = "URL" and [[upstream]] cannot both be in one TOML file
        located = error(tmp_path, f'{option} = "{value}"\n' + TWO)
        assert located == f'--config {tmp_path}/ecrproxy.toml line 1: key "{option}": {message}'
    else:
        assert "not valid TOML: Cannot overwrite a value" in error(tmp_path, f'{option} = "{value}"\n' + TWO)


# --- errors: one message, the file, the line, the key ---

def at(tmp_path: Path, line: int | None, rest: str) -> str:
    return f"--config {tmp_path}/ecrproxy.toml" + (f" line {line}" if line else "") + f": {rest}"


def test_toml_syntax_errors_carry_line_and_column(tmp_path: Path) -> None:
    assert error(tmp_path, 'auth = "none"\n\nregion = eu-west-1\n') == at(
        tmp_path, None, "").rstrip(": ") + " line 3 column 10: not valid TOML: Invalid value"
    assert error(tmp_path, '[[upstream]]\nname = "a"\nname = "b"\n').startswith(
        f"--config {tmp_path}/ecrproxy.toml line 3 column ")


def test_unknown_keys_name_the_closest_known_one(tmp_path: Path) -> None:
    assert error(tmp_path, 'auth = "none"\nregoin = "eu-west-1"\n') == at(
        tmp_path, 2, 'unknown key "regoin" (did you mean "region"?)')
    assert error(tmp_path, 'auth = "none"\n[[upstreams]]\nname = "a"\n') == at(
        tmp_path, 2, 'unknown key "upstreams" (did you mean "upstream"?)')
    assert error(tmp_path, 'auth = "none"\nzzz = 1\n') == at(tmp_path, 2, 'unknown key "zzz"')
    assert error(tmp_path, TWO + 'regsitry-id = "1"\n') == at(
        tmp_path, 16, 'upstream "staging": unknown key "regsitry-id" (did you mean "registry-id"?)')
    assert error(tmp_path, 'config = "other.toml"\n') == at(
        tmp_path, 1, 'key "config": a config file cannot name another one')
    assert error(tmp_path, 'auth = "none"\n[upstream]\nname = "a"\n') == at(
        tmp_path, 2, 'key "upstream": must be a registry URL (--upstream) or tables: write [[upstream]] above each one')


@pytest.mark.parametrize("text,line,rest", [
    ('workers = "2"', 2, 'key "workers" must be a whole number, not a string'),
    ("workers = 2.5", 2, 'key "workers" must be a whole number, not a number'),
    ("read-only = 1", 2, 'key "read-only" must be true or false, not a whole number'),
    ("region = 1", 2, 'key "region" must be a string, not a whole number'),
    ("tag-ttl = true", 2, 'key "tag-ttl" must be a number, not true/false'),
    ("port = []", 2, 'key "port" must be an array of strings, not an array'),
    ("port = [true]", 2, 'key "port" must be an array of strings, not an array'),
    ("cache-size = 1.5", 2, 'key "cache-size" must be a string or a whole number, not a number'),
])
def test_wrong_types_are_errors(tmp_path: Path, text: str, line: int, rest: str) -> None:
    assert error(tmp_path, 'auth = "none"\n' + text + "\n") == at(tmp_path, line, rest.replace(" must", ": must", 1))


@pytest.mark.parametrize("text,line,rest", [
    ('blob-mode = "copy"', 3, 'key "blob-mode": --blob-mode must be stream or redirect'),
    ('region = "moon"', 3, 'key "region": --region is required (e.g. eu-west-1), or set AWS_REGION or configure '
     "botocore's region"),
    ("workers = 0", 3, 'key "workers": --workers must be between 1 and 64'),
    ("catalog-ttl = -1", 3, 'key "catalog-ttl": --catalog-ttl must be 0 or a positive number of seconds'),
    ('port = ["5000", "nonsense:1"]', 3, 'key "port": --port: '),
    ('upstream = "ftp://x"', 3, "key \"upstream\": --upstream must look like https://host[:port], got 'ftp://x'"),
    ('cache-dir = "/etc/hostname"', 3, 'key "cache-dir": --cache-dir /etc/hostname: not a directory'),
    ('htpasswd = "h"', 3, 'key "htpasswd": --htpasswd is for --auth basic or token, not none'),
])
def test_file_values_get_the_command_lines_checks_at_their_line(tmp_path: Path, text: str, line: int,
                                                                 rest: str) -> None:
    message = error(tmp_path, '# the file\nauth = "none"\n' + text + "\n")
    assert message.startswith(at(tmp_path, line, rest))


def test_an_error_about_a_command_line_value_is_not_put_on_the_file(tmp_path: Path) -> None:
    assert error(tmp_path, 'auth = "none"\nblob-mode = "stream"\n', ["--blob-mode", "copy"]) == (
        "--blob-mode must be stream or redirect")


def test_an_unreadable_file_is_one_message(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as e:
        Options(environ=ENV).parseOptions(["--config", str(tmp_path / "missing.toml")])
    assert str(e.value) == f"--config {tmp_path}/missing.toml: No such file or directory"
    (tmp_path / "bin.toml").write_bytes(b"auth = \"\xff\"\n")
    with pytest.raises(UsageError) as e:
        Options(environ=ENV).parseOptions(["--config", str(tmp_path / "bin.toml")])
    assert str(e.value) == f"--config {tmp_path}/bin.toml: not UTF-8 text"


HEAD = 'auth = "none"\nregion = "eu-west-1"\n\n[[upstream]]\n'  # the table's keys start at line 5


@pytest.mark.parametrize("table,line,rest", [
    ('prefix = "a"', 4, 'upstream #1: needs key "name" (lowercase letters, digits and -, up to 32)'),
    ('name = "Prod"\nprefix = "a"', 5,
     "upstream #1 key \"name\": 'Prod' is not a name: lowercase letters, digits and - (not first), up to 32"),
    ('name = "p"\nkind = "oci"', 6, "upstream \"p\" key \"kind\": 'oci' is not a kind: \"ecr\" or \"registry\""),
    ('name = "p"\nprefix = "p"', 4,
     'upstream "p": needs key "url" (a registry URL), or "registry-id"/"region" for an ECR registry'),
    ('name = "p"\nkind = "registry"\nregion = "eu-west-1"', 7,
     'upstream "p" key "region": is for ECR upstreams (kind = "ecr"), not a registry URL'),
    ('name = "p"\nregistry-id = "1234"', 6,
     "upstream \"p\" key \"registry-id\": '1234' is not a 12-digit AWS account ID"),
    ('name = "prod"\nregistry-id = "111111111111"\n\nregion = "eu-west"', 8,
     "upstream \"prod\" key \"region\": 'eu-west' is not an AWS region"),
    ('name = "p"\nurl = "https://r.example/v2"\nprefix = "p"', 6,
     "upstream \"p\" key \"url\": takes no path or query, got 'https://r.example/v2'"),
    ('name = "p"\nurl = "r.example"', 6,
     "upstream \"p\" key \"url\": must look like https://host[:port], got 'r.example'"),
    ('name = "p"\nregion = "eu-west-1"\necr-endpoint-url = "ftp://x"', 7,
     "upstream \"p\" key \"ecr-endpoint-url\": must look like https://host[:port], got 'ftp://x'"),
    ('name = "p"\nkind = "ecr"\ncredentials = "static"', 7,
     "upstream \"p\" key \"credentials\": 'static' is not for an ECR upstream: default or profile or role"),
    ('name = "p"\nurl = "https://r.example"\ncredentials = "role"', 7,
     "upstream \"p\" key \"credentials\": 'role' is not for a registry upstream: static or none"),
    ('name = "p"\nkind = "ecr"\ncredentials = "magic"', 7,
     "upstream \"p\" key \"credentials\": 'magic' is not one of default, none, profile, role, static"),
    ('name = "p"\nkind = "ecr"\ncredentials = "profile"', 4,
     'upstream "p": credentials = "profile" needs key "profile"'),
    ('name = "p"\nkind = "ecr"\ncredentials = "role"', 4, 'upstream "p": credentials = "role" needs key "role-arn"'),
    ('name = "p"\nkind = "ecr"\nrole-arn = "arn:aws:iam::1:role/x"', 7,
     "upstream \"p\" key \"role-arn\": 'arn:aws:iam::1:role/x' is not a role ARN (arn:aws:iam::<account>:role/<name>)"),
    ('name = "p"\nkind = "ecr"\nrole-arn = "arn:aws:iam::111111111111:user/x"', 7,
     "upstream \"p\" key \"role-arn\": 'arn:aws:iam::111111111111:user/x' is not a role ARN "
     "(arn:aws:iam::<account>:role/<name>)"),
    ('name = "p"\nkind = "ecr"\ncredentials = "profile"\nprofile = "x"\nexternal-id = "abc"', 9,
     "upstream \"p\" key \"external-id\": is for credentials = 'role', not 'profile'"),
    ('name = "p"\nkind = "ecr"\nprofile = "x"\nusername = "u"', 8,
     "upstream \"p\" key \"username\": is for credentials = 'static', not 'profile'"),
    ('name = "p"\nkind = "ecr"\nrole-arn = "arn:aws:iam::111111111111:role/x"\nsession-name = "a b"', 8,
     "upstream \"p\" key \"session-name\": 'a b' is not a session name: 2 to 64 letters, digits or +=,.@-"),
    ('name = "p"\nurl = "https://r.example"\ncredentials = "static"', 4,
     'upstream "p": credentials = "static" needs key "username"'),
    ('name = "p"\nurl = "https://r.example"\nusername = "u"', 4,
     'upstream "p": credentials = "static" needs one of "password" or "password-file"'),
    ('name = "p"\nurl = "https://r.example"\nusername = "u:v"\npassword = "x"', 7,
     "upstream \"p\" key \"username\": a user name cannot contain ':' (Basic credentials)"),
    ('name = "p"\nurl = "https://r.example"\nusername = "u"\npassword-file = "missing"', 8,
     'upstream "p" key "password-file": cannot read {dir}/missing: No such file or directory'),
    ('name = "p"\nurl = "https://r.example"\nusername = "u"\npassword-file = "empty"', 8,
     'upstream "p" key "password-file": {dir}/empty is empty'),
    ('name = "p"\nurl = "https://r.example"\nprefix = "A/b"', 7,
     "upstream \"p\" key \"prefix\": 'A/b' is not a repository path (lowercase letters, digits, . _ - separated, "
     "/ between components)"),
    ('name = "p"\nurl = "https://r.example"\nhosts = ["r.example.com:443"]', 7,
     "upstream \"p\" key \"hosts\": 'r.example.com:443' is not a host name (no port, no scheme)"),
    ('name = "p"\nurl = "https://r.example"\nhosts = ["a.example", "A.example"]', 7,
     "upstream \"p\" key \"hosts\": 'A.example' is listed twice"),
    ('name = "p"\nurl = "https://r.example"\nhosts = "a.example"', 7,
     'upstream "p" key "hosts": must be an array of strings, not a string'),
    ('name = "p"\nurl = "https://r.example"\ndefault = "yes"', 7,
     'upstream "p" key "default": must be true or false, not a string'),
    ('name = "p"\nurl = "https://r.example"\nprefix = "p"\ndefault = true', 7,
     'upstream "p" key "prefix": the default upstream takes no prefix (names that match no prefix go to it)'),
    ('name = "p"\nurl = "https://r.example"', 4,
     'upstream "p": is reachable by no name: give it a "prefix", "hosts" or default = true'),
])
def test_upstream_errors_name_the_file_line_upstream_and_key(tmp_path: Path, table: str, line: int,
                                                             rest: str) -> None:
    (tmp_path / "empty").write_text("\n")
    assert error(tmp_path, HEAD + table + "\n") == at(tmp_path, line, rest.replace("{dir}", str(tmp_path)))


@pytest.mark.parametrize("first,second,line,rest", [
    ("default = true", 'name = "a"\nurl = "https://r.example"\nprefix = "b"', 8,
     "upstream #2 key \"name\": 'a' is already the name of upstream #1"),
    ("default = true", 'name = "b"\nurl = "https://r.example"\ndefault = true', 10,
     'upstream "b" key "default": upstream "a" is already the default (at most one)'),
    ('prefix = "a"', 'name = "b"\nurl = "https://r.example"\nprefix = "a"', 10,
     'upstream "b" key "prefix": public names a/<repository> would overlap those of upstream "a" (a/<repository>): '
     "every public name belongs to one upstream (an upstream without a prefix is named by its name)"),
    ('prefix = "a"', 'name = "b"\nurl = "https://r.example"\nprefix = "a/x"', 10,
     'upstream "b" key "prefix": public names a/x/<repository> would overlap those of upstream "a" '
     "(a/<repository>): every public name belongs to one upstream (an upstream without a prefix is named by its "
     "name)"),
    ('prefix = "a/x/y"', 'name = "b"\nurl = "https://r.example"\nprefix = "a/x"', 10,
     'upstream "b" key "prefix": public names a/x/<repository> would overlap those of upstream "a" '
     "(a/x/y/<repository>): every public name belongs to one upstream (an upstream without a prefix is named by its "
     "name)"),
    ("default = true", 'name = "b"\nurl = "https://r.example"\nhosts = ["A.example.com"]', 10,
     "upstream \"b\" key \"hosts\": 'a.example.com' is already a host of upstream \"a\""),
])
def test_upstreams_share_no_name_default_namespace_or_host(tmp_path: Path, first: str, second: str, line: int,
                                                           rest: str) -> None:
    text = ('auth = "none"\n[[upstream]]\nname = "a"\nurl = "https://q.example"\nhosts = ["a.example.com"]\n'
            + first + "\n[[upstream]]\n" + second + "\n")
    assert error(tmp_path, text) == at(tmp_path, line, rest)


def test_prefixes_may_share_leading_characters_but_not_components(tmp_path: Path) -> None:
    text = ('auth = "none"\n[[upstream]]\nname = "a"\nurl = "https://q.example"\nprefix = "team"\n'
            '[[upstream]]\nname = "b"\nurl = "https://r.example"\nprefix = "team-b"\n')
    assert [u.namespace for u in load(tmp_path, text).settings.upstreams] == ["team", "team-b"]


def test_a_host_only_upstream_is_named_by_its_name_in_public_names(tmp_path: Path) -> None:
    text = ('auth = "none"\n[[upstream]]\nname = "prod"\nurl = "https://q.example"\nhosts = ["p.example"]\n'
            '[[upstream]]\nname = "other"\nurl = "https://r.example"\nprefix = "prod/x"\n')
    assert 'key "prefix": public names prod/x/<repository> would overlap' in error(tmp_path, text)


def test_a_password_never_appears_in_a_message(tmp_path: Path) -> None:
    text = HEAD + 'name = "p"\nurl = "https://r.example"\nusername = "u"\npassword = 12345\n'
    message = error(tmp_path, text)
    assert message == at(tmp_path, 8, 'upstream "p" key "password": must be a string, not a whole number')
    assert "12345" not in message
    message = error(tmp_path, HEAD + 'name = "p"\nkind = "ecr"\npassword = "hunter2"\n')
    assert "hunter2" not in message and 'key "password"' in message


# --- --egress-proxy ---

@pytest.mark.parametrize("value,rest", [
    ("https://user:hunter2@proxy.example:3128",
     "https:// proxies are not supported (the proxy is spoken to in plain HTTP; CONNECT tunnels carry the TLS): "
     "use http://, got 'https://***@proxy.example:3128'"),
    ("http://user:hunter2@proxy.example", "needs a port (http://host:port), got 'http://***@proxy.example'"),
    ("socks5://user:hunter2@proxy.example:1080",
     "must look like http://[user:password@]host:port, got 'socks5://***@proxy.example:1080'"),
    ("user:hunter2@proxy.example:3128",
     "must look like http://[user:password@]host:port, got '***@proxy.example:3128'"),
    ("http://u:hunter2@proxy.example:99999", "must look like http://[user:password@]host:port, got "
     "'http://***@proxy.example:99999'"),
    # an unescaped / in the password ends the authority for urlsplit: no port then, and still nothing shown
    ("http://u:hun@ter/2@proxy.example:3128/path", "needs a port (http://host:port), got "
     "'http://***@proxy.example:3128/path'"),
    ("http://u:hunter2@proxy.example:3128/path", "takes no path or query, got 'http://***@proxy.example:3128/path'"),
    ("http://:3128", "must look like http://[user:password@]host:port, got 'http://:3128'"),
])
def test_egress_proxy_is_checked_without_showing_its_credentials(tmp_path: Path, value: str, rest: str) -> None:
    message = error(tmp_path, 'auth = "none"\n', ["--egress-proxy", value])
    assert message == "--egress-proxy " + rest
    assert "hunter2" not in message and "hun@ter" not in message
    in_file = error(tmp_path, f'auth = "none"\negress-proxy = "{value}"\n')
    assert in_file == at(tmp_path, 2, f'key "egress-proxy": {message}')


def test_egress_proxy_with_credentials_is_kept_whole(tmp_path: Path) -> None:
    o = load(tmp_path, 'auth = "none"\n', ["--egress-proxy", "http://u:p%40ss@proxy.example:3128/"])
    assert o.settings.egress_proxy == "http://u:p%40ss@proxy.example:3128/"


def test_redacted() -> None:
    assert configfile.redacted("http://proxy:3128") == "http://proxy:3128"
    assert configfile.redacted("http://u:p@proxy:3128") == "http://***@proxy:3128"


# --- the README's example, as it is written there ---

def readme_example() -> str:
    text = README.read_text("utf-8")
    m = re.search(r"<!-- example-config -->\n```toml\n(.*?)```\n<!-- /example-config -->", text, re.DOTALL)
    assert m is not None, "README.md lost its example config block"
    return m.group(1)


def test_the_readme_example_loads(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "ecrproxy.toml").write_text(readme_example())
    # the files it names beside itself
    write_htpasswd(str(etc / "htpasswd"), {"alice": "pw"})
    (etc / "policy.toml").write_text(
        '[[rule]]\nprincipals = ["authenticated"]\nactions = ["pull", "push"]\nrepositories = ["*"]\n'
    )
    (etc / "mirror-password").write_text("robot-secret\n")
    # its absolute cache directory may not be creatable here: the environment wins over the file
    o = Options(environ={"ECRPROXY_CACHE_DIR": str(tmp_path / "cache")})
    o.parseOptions(["--config", str(etc / "ecrproxy.toml")])
    s = o.settings
    assert (s.auth, s.htpasswd, s.policy) == ("token", str(etc / "htpasswd"), str(etc / "policy.toml"))
    assert (s.ports, s.metrics_port, s.region, s.catalog_ttl) == (("5000",), "tcp:9100", "eu-west-1", 60.0)
    assert s.egress_proxy == "http://proxy.corp.example.com:3128" and s.cache_bytes == 100 << 30
    assert s.cache_dir == str(tmp_path / "cache")
    prod, shared, mirror = s.upstreams
    assert (prod.kind, prod.registry_id, prod.region, prod.credentials, prod.namespace) == (
        "ecr", "111111111111", "eu-west-1", "default", "")
    assert (shared.region, shared.credentials, shared.role_arn, shared.hosts, shared.namespace, shared.optional) == (
        "us-east-1", "role", "arn:aws:iam::222222222222:role/ecr-twisted-pull", ("shared.registry.example.com",),
        "shared", True)
    assert (mirror.kind, mirror.credentials, mirror.username, mirror.password, mirror.namespace) == (
        "registry", "static", "ecr-twisted-robot", "robot-secret", "mirror")


def test_unknown_env_knows_the_new_options() -> None:
    from ecr_twisted.app.options import unknown_env

    assert unknown_env({"ECRPROXY_CONFIG": "x", "ECRPROXY_EGRESS_PROXY": "x", "ECRPROXY_CATALOG_TTL": "1"}) == []
    assert unknown_env({"ECRPROXY_CONFG": "x"}) == ["ECRPROXY_CONFG (did you mean ECRPROXY_CONFIG?)"]


def test_a_file_of_registries_only_needs_no_region(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No ECR upstream, no region to know: neither --region nor AWS_REGION is asked for (an ECR
    upstream without one still is)."""
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))  # botocore's own config names no region
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    text = 'auth = "none"\n[[upstream]]\nname = "hub"\nurl = "https://registry.example.net"\nprefix = "hub"\n'
    path = tmp_path / "c.toml"
    path.write_text(text)
    o = Options(environ={})
    o.parseOptions(["--config", str(path)])
    assert o.settings.region == "" and [u.name for u in o.settings.upstreams] == ["hub"]
    path.write_text(text + '[[upstream]]\nname = "prod"\nregistry-id = "111111111111"\nprefix = "prod"\n')
    with pytest.raises(UsageError, match="region"):
        Options(environ={}).parseOptions(["--config", str(path)])


def test_blob_redirects_may_lead_to_the_s3_of_every_ecr_upstreams_region() -> None:
    from ecr_twisted.app.build import redirect_rules
    from ecr_twisted.app.config import ProxySettings

    specs = (
        UpstreamSpec("prod", registry_id="111111111111", region="eu-west-1", default=True),
        UpstreamSpec("shared", registry_id="222222222222", prefix="shared"),  # --region's
        UpstreamSpec("hub", "registry", url="https://registry.example.net", prefix="hub"),
    )
    rules = redirect_rules(ProxySettings(auth="none", region="us-east-2", upstreams=specs))
    hosts = {p.host for p in rules.patterns}
    assert {"*.s3.eu-west-1.amazonaws.com", "*.s3.us-east-2.amazonaws.com"} <= hosts
    only_hub = redirect_rules(ProxySettings(auth="none", region="", upstreams=specs[2:]))
    assert not only_hub.patterns  # no ECR: no S3 by default (--storage-hosts names a CDN)
