"""The `--config` file (TOML): option values and `[[upstream]]` tables, checked, each error at its line.

Pure: text in, values out, or one `ConfigError` whose message names the file, the line and the
key (`--config /etc/x.toml line 12: upstream "prod" key "region": "eu-west" is not an AWS region`).
tomllib gives values without positions, so the line of a key is found by scanning the text for
its table and `key =`; a key that cannot be found (written as a dotted key or inline table) is
reported at its table's line, or without a line.

`app.options` decides precedence (command line, ECRPROXY_*, this file, defaults) and runs the
file's option values through the same checks as command-line ones; this module only knows
their kinds. Reading a password file is done through a function passed in. Relative paths
in the file are from the file's directory (`beside`).
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

from ecr_twisted.http.origin import Origin
from ecr_twisted.registry.routes import valid_name
from ecr_twisted.upstreams.spec import CREDENTIALS, ECR, REGISTRY, UpstreamSpec

__all__ = [
    "ACCOUNT", "REGION", "FLAG", "TEXT", "INT", "FLOAT", "PORTS", "TEXT_OR_INT", "UPSTREAM_KEYS",
    "ConfigError", "ConfigFile", "parse", "table_kind", "upstreams", "beside", "url_problem",
    "egress_proxy_problem", "redacted",
]

REGION = re.compile(r"[a-z]{2}(?:-[a-z]+)+-[0-9]+\Z")
ACCOUNT = re.compile(r"[0-9]{12}\Z")

# the kinds of option values a file may give (app.options says which option has which)
FLAG = "flag"  # true / false
TEXT = "text"
INT = "int"
FLOAT = "float"  # an integer is taken too
PORTS = "ports"  # an array of endpoint strings (or port numbers), or one of them
TEXT_OR_INT = "text-or-int"  # a string, or an integer the command line would spell the same (9100, 1048576)

_KIND_WANTED = {
    FLAG: "true or false", TEXT: "a string", INT: "a whole number", FLOAT: "a number",
    PORTS: "an array of strings", TEXT_OR_INT: "a string or a whole number",
}

_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,31}\Z")
_ROLE_ARN = re.compile(r"arn:aws[-a-z]*:iam::[0-9]{12}:role/[\w+=,.@/-]{1,512}\Z")
_EXTERNAL_ID = re.compile(r"[\w+=,.@:/-]{2,1224}\Z")
_SESSION_NAME = re.compile(r"[\w+=,.@-]{2,64}\Z")
_HOST_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)\Z")
_HEADER = re.compile(r"\s*\[")
_UPSTREAM_HEADER = re.compile(r"\s*\[\[\s*(?:upstream|\"upstream\"|'upstream')\s*\]\]")
_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)\Z")

# every key of an [[upstream]] table (see upstreams.spec), and what it holds
UPSTREAM_KEYS: Mapping[str, type] = {
    "name": str, "kind": str, "registry-id": str, "region": str, "url": str, "credentials": str,
    "profile": str, "role-arn": str, "external-id": str, "session-name": str, "username": str,
    "password": str, "password-file": str, "ecr-endpoint-url": str, "sts-endpoint-url": str,
    "prefix": str, "hosts": list, "default": bool, "optional": bool,
}
_ECR_ONLY = ("registry-id", "region", "ecr-endpoint-url", "sts-endpoint-url")
_CREDENTIAL_KEYS = {  # which keys each credentials choice takes
    "default": (), "profile": ("profile",), "role": ("role-arn", "profile", "external-id", "session-name"),
    "static": ("username", "password", "password-file"), "none": (),
}
_ECR_CREDENTIALS: tuple[str, ...] = ("default", "profile", "role")
_REGISTRY_CREDENTIALS: tuple[str, ...] = ("static", "none")


class ConfigError(ValueError):
    """A file that cannot be used: the message is the whole report, file and line included."""


@dataclass(frozen=True)
class ConfigFile:
    """A parsed file: option values already of their option's kind, and the raw upstream tables."""

    path: str
    text: str
    options: Mapping[str, Any]  # option name -> bool, str, int, float, or list of str (port)
    tables: tuple[Mapping[str, Any], ...] = ()
    _lines: tuple[str, ...] = field(default=(), repr=False, compare=False)

    def where(self, key: str | None = None, table: int | None = None) -> str:
        """`--config PATH line N` (where `key` is, in upstream table `table` or at the top)."""
        line = self.line_of(key, table)
        return f"--config {self.path}" + (f" line {line}" if line else "")

    def line_of(self, key: str | None, table: int | None = None) -> int | None:
        lines = self._lines or tuple(self.text.splitlines())
        if table is None:
            start, end = 0, next((i for i, t in enumerate(lines) if _HEADER.match(t)), len(lines))
            if key is not None:
                found = _key_line(lines, start, end, key)
                if found is None:  # a table of that name: [key] or [[key]]
                    header = re.compile(rf"\s*\[\[?\s*{_key_pattern(key)}\s*\]")
                    found = next((i for i, t in enumerate(lines) if header.match(t)), None)
                return None if found is None else found + 1
            return None
        headers = [i for i, t in enumerate(lines) if _UPSTREAM_HEADER.match(t)]
        if table >= len(headers):  # written some other way (an inline array): the key's line, if unique
            if key is None:
                return None
            found = _key_line(lines, 0, len(lines), key)
            return None if found is None else found + 1
        start = headers[table]
        end = next((i for i in range(start + 1, len(lines)) if _HEADER.match(lines[i])), len(lines))
        found = _key_line(lines, start + 1, end, key) if key is not None else None
        return (start if found is None else found) + 1

    def error(self, message: str, key: str | None = None, table: int | None = None) -> ConfigError:
        """The error for `message` about `key` (of upstream table `table`, else at the top)."""
        if table is None:
            subject = f'key "{key}": ' if key is not None else ""
        else:
            subject = _table_name(self.tables, table) + (f' key "{key}"' if key is not None else "") + ": "
        return ConfigError(f"{self.where(key, table)}: {subject}{message}")


def _key_pattern(key: str) -> str:
    quoted = re.escape(key)
    return rf"(?:{quoted}|\"{quoted}\"|'{quoted}')"


def _key_line(lines: tuple[str, ...], start: int, end: int, key: str) -> int | None:
    pattern = re.compile(rf"\s*{_key_pattern(key)}\s*=")
    return next((i for i in range(start, end) if pattern.match(lines[i])), None)


def _table_name(tables: tuple[Mapping[str, Any], ...], index: int) -> str:
    name = tables[index].get("name") if index < len(tables) else None
    return f'upstream "{name}"' if isinstance(name, str) and _NAME.match(name) else f"upstream #{index + 1}"


def _what(value: object) -> str:
    """The TOML type of `value`, for "must be X, not Y" (never the value: it may be a secret)."""
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int):
        return "a whole number"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "a date or time"


def parse(text: str, path: str, kinds: Mapping[str, str]) -> ConfigFile:
    """The file's option values (each of its kind in `kinds`) and upstream tables; checks no value's meaning."""
    lines = tuple(text.splitlines())
    shell = ConfigFile(path, text, {}, (), lines)
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        message = str(e)
        m = _TOML_POSITION.search(message)
        if m is None:
            raise ConfigError(f"--config {path}: not valid TOML: {message}") from None
        raise ConfigError(
            f"--config {path} line {m.group(1)} column {m.group(2)}: not valid TOML: {message[: m.start()]}"
        ) from None
    options: dict[str, Any] = {}
    tables: tuple[Mapping[str, Any], ...] = ()
    for key, value in document.items():
        if key == "upstream" and not isinstance(value, str):  # a string: the --upstream option
            if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
                raise shell.error("must be a registry URL (--upstream) or tables: write [[upstream]] above each one",
                                  key)
            tables = tuple(value)
        elif key == "config":
            raise shell.error("a config file cannot name another one", key)
        elif key not in kinds:
            raise ConfigError(f"{shell.where(key)}: {_unknown(key, [*kinds, 'upstream'])}")
        else:
            options[key] = _option_value(shell, key, value, kinds[key])
    config = ConfigFile(path, text, options, tables, lines)
    for index, table in enumerate(tables):
        _check_table_keys(config, index, table)
    return config


def _unknown(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f'unknown key "{key}"' + (f' (did you mean "{close[0]}"?)' if close else "")


def _option_value(config: ConfigFile, key: str, value: Any, kind: str) -> Any:
    """`value` as the option takes it (flags bool, --port a list of strings), or a type error."""
    wrong = config.error(f"must be {_KIND_WANTED[kind]}, not {_what(value)}", key)
    integer = isinstance(value, int) and not isinstance(value, bool)
    if kind == FLAG:
        if not isinstance(value, bool):
            raise wrong
        return value
    if kind == TEXT:
        if not isinstance(value, str):
            raise wrong
        return value
    if kind == INT:
        if not integer:
            raise wrong
        return value
    if kind == FLOAT:
        if not (integer or isinstance(value, float)):
            raise wrong
        return float(value)
    if kind == TEXT_OR_INT:
        if not (integer or isinstance(value, str)):
            raise wrong
        return str(value)
    if kind == PORTS:
        items = value if isinstance(value, list) else [value]
        if not items or not all(isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool))
                                for v in items):
            raise wrong
        return [str(v) for v in items]
    raise AssertionError(kind)


def _check_table_keys(config: ConfigFile, index: int, table: Mapping[str, Any]) -> None:
    for key, value in table.items():
        wanted = UPSTREAM_KEYS.get(key)
        if wanted is None:
            line = config.line_of(key, index)
            raise ConfigError(f"--config {config.path}" + (f" line {line}" if line else "")
                              + f": {_table_name(config.tables, index)}: {_unknown(key, list(UPSTREAM_KEYS))}")
        if wanted is list:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise config.error(f"must be an array of strings, not {_what(value)}", key, index)
        elif not isinstance(value, wanted):
            shown = {str: "a string", bool: "true or false"}[wanted]
            raise config.error(f"must be {shown}, not {_what(value)}", key, index)


def table_kind(table: Mapping[str, Any]) -> str:
    """What an `[[upstream]]` table describes: `kind`, else ECR when it names an account or region."""
    return table.get("kind") or (ECR if "registry-id" in table or "region" in table else REGISTRY)


def upstreams(
    config: ConfigFile, default_region: str | None, read_secret: Callable[[str], str]
) -> tuple[UpstreamSpec, ...]:
    """The file's `[[upstream]]` tables as checked `UpstreamSpec`s (in file order).

    `default_region`: the global --region, for ECR upstreams without their own. `read_secret(path)`
    returns a password file's text (OSError if it cannot); its content never appears in an error.
    """
    specs = tuple(_upstream(config, i, t, default_region, read_secret) for i, t in enumerate(config.tables))
    _check_together(config, specs)
    return specs


def _upstream(
    config: ConfigFile, index: int, table: Mapping[str, Any], default_region: str | None,
    read_secret: Callable[[str], str],
) -> UpstreamSpec:
    def fail(message: str, key: str | None = None) -> ConfigError:
        return config.error(message, key, index)

    name = table.get("name")
    if name is None:
        raise fail('needs key "name" (lowercase letters, digits and -, up to 32)')
    if not _NAME.match(name):
        raise fail(f"{name!r} is not a name: lowercase letters, digits and - (not first), up to 32", "name")
    kind = table_kind(table)
    if kind not in (ECR, REGISTRY):
        raise fail(f'{kind!r} is not a kind: "ecr" or "registry"', "kind")
    if kind == REGISTRY:
        for key in _ECR_ONLY:
            if key in table:
                raise fail('is for ECR upstreams (kind = "ecr"), not a registry URL', key)
        if "url" not in table:
            raise fail('needs key "url" (a registry URL), or "registry-id"/"region" for an ECR registry')
    registry_id = table.get("registry-id")
    if registry_id is not None and not ACCOUNT.match(registry_id):
        raise fail(f"{registry_id!r} is not a 12-digit AWS account ID", "registry-id")
    region = None
    if kind == ECR:
        region = table.get("region", default_region)
        if region is None:
            raise fail('needs key "region" (there is no --region to default to)')
        if not REGION.match(region):
            raise fail(f"{region!r} is not an AWS region", "region" if "region" in table else None)
    for key, allow_path in (("url", False), ("ecr-endpoint-url", True), ("sts-endpoint-url", True)):
        if key in table:
            problem = url_problem(table[key], allow_path)
            if problem:
                raise fail(problem, key)
    credentials, password = _credentials(config, index, table, kind, read_secret)
    prefix = table.get("prefix")
    if prefix is not None and not valid_name(prefix):
        raise fail(f"{prefix!r} is not a repository path (lowercase letters, digits, . _ - separated, / between "
                   "components)", "prefix")
    hosts = []
    for host in table.get("hosts", ()):
        lowered = host.lower().rstrip(".")
        if not _host_name(lowered):
            raise fail(f"{host!r} is not a host name (no port, no scheme)", "hosts")
        if lowered in hosts:
            raise fail(f"{host!r} is listed twice", "hosts")
        hosts.append(lowered)
    default = table.get("default", False)
    if default and prefix is not None:
        raise fail("the default upstream takes no prefix (names that match no prefix go to it)", "prefix")
    if not (default or prefix is not None or hosts):
        raise fail('is reachable by no name: give it a "prefix", "hosts" or default = true')
    return UpstreamSpec(
        name, kind, registry_id=registry_id, region=region, url=table.get("url"), credentials=credentials,
        profile=table.get("profile"), role_arn=table.get("role-arn"), external_id=table.get("external-id"),
        session_name=table.get("session-name"), username=table.get("username"), password=password,
        ecr_endpoint_url=table.get("ecr-endpoint-url"), sts_endpoint_url=table.get("sts-endpoint-url"),
        prefix=prefix, hosts=tuple(hosts), default=default, optional=table.get("optional", False),
    )


def _credentials(
    config: ConfigFile, index: int, table: Mapping[str, Any], kind: str, read_secret: Callable[[str], str]
) -> tuple[str, str | None]:
    """The credentials choice (given, or inferred from the keys present) and a static password."""

    def fail(message: str, key: str | None = None) -> ConfigError:
        return config.error(message, key, index)

    if kind == ECR:
        credentials = table.get("credentials") or (
            "role" if "role-arn" in table else "profile" if "profile" in table else "default")
        allowed = _ECR_CREDENTIALS
    else:
        credentials = table.get("credentials") or (
            "static" if {"username", "password", "password-file"} & set(table) else "none")
        allowed = _REGISTRY_CREDENTIALS
    if credentials not in CREDENTIALS:
        raise fail(f"{credentials!r} is not one of {', '.join(sorted(CREDENTIALS))}", "credentials")
    if credentials not in allowed:
        raise fail(f"{credentials!r} is not for {'an ECR' if kind == ECR else 'a registry'} upstream: "
                   f"{' or '.join(allowed)}", "credentials")
    for key in ("profile", "role-arn", "external-id", "session-name", "username", "password", "password-file"):
        if key in table and key not in _CREDENTIAL_KEYS[credentials]:
            takes = [c for c, keys in _CREDENTIAL_KEYS.items() if key in keys]
            raise fail(f'is for credentials = {" or ".join(repr(c) for c in takes)}, not {credentials!r}', key)
    if credentials == "profile" and not table.get("profile"):
        raise fail('credentials = "profile" needs key "profile"')
    if credentials == "role":
        arn = table.get("role-arn")
        if arn is None:
            raise fail('credentials = "role" needs key "role-arn"')
        if not _ROLE_ARN.match(arn):
            raise fail(f"{arn!r} is not a role ARN (arn:aws:iam::<account>:role/<name>)", "role-arn")
        if "external-id" in table and not _EXTERNAL_ID.match(table["external-id"]):
            raise fail("must be 2 to 1224 letters, digits or +=,.@:/-", "external-id")
        if "session-name" in table and not _SESSION_NAME.match(table["session-name"]):
            raise fail(f"{table['session-name']!r} is not a session name: 2 to 64 letters, digits or +=,.@-",
                       "session-name")
    password = None
    if credentials == "static":
        username = table.get("username")
        if not username:
            raise fail('credentials = "static" needs key "username"')
        if ":" in username:
            raise fail("a user name cannot contain ':' (Basic credentials)", "username")
        if ("password" in table) == ("password-file" in table):
            raise fail('credentials = "static" needs one of "password" or "password-file"')
        if "password-file" in table:
            where = beside(config.path, table["password-file"])
            try:
                password = read_secret(where).strip()
            except OSError as e:
                raise fail(f"cannot read {where}: {e.strerror or e}", "password-file") from None
            except UnicodeDecodeError:
                raise fail(f"{where} is not UTF-8 text", "password-file") from None
            if not password:
                raise fail(f"{where} is empty", "password-file")
        else:
            password = table["password"]
            if not password:
                raise fail("is empty", "password")
    return credentials, password


def beside(config_path: str, path: str) -> str:
    """`path` as written in the file at `config_path`: a relative one is taken from the file's directory
    (where it is kept with the files it names), as `config_path` itself is from the working directory."""
    return os.path.join(os.path.dirname(config_path), path)


def _host_name(host: str) -> bool:
    labels = host.split(".")
    return 0 < len(host) <= 253 and all(_HOST_LABEL.match(label) for label in labels)


def _check_together(config: ConfigFile, specs: tuple[UpstreamSpec, ...]) -> None:
    """Names, defaults, public namespaces and host names: each belongs to one upstream."""
    names: dict[str, int] = {}
    hosts: dict[str, str] = {}
    namespaces: list[tuple[tuple[str, ...], UpstreamSpec]] = []
    default: str | None = None
    for index, spec in enumerate(specs):
        if spec.name in names:
            raise ConfigError(f"{config.where('name', index)}: upstream #{index + 1} key \"name\": "
                              f"{spec.name!r} is already the name of upstream #{names[spec.name] + 1}")
        names[spec.name] = index
        if spec.default:
            if default is not None:
                raise config.error(f'upstream "{default}" is already the default (at most one)', "default", index)
            default = spec.name
        for host in spec.hosts:
            if host in hosts:
                raise config.error(f"{host!r} is already a host of upstream \"{hosts[host]}\"", "hosts", index)
            hosts[host] = spec.name
        if not spec.default:
            mine = tuple(spec.namespace.split("/"))
            key = "prefix" if spec.prefix is not None else "name"
            for theirs, other in namespaces:
                shorter = min(len(mine), len(theirs))
                if mine[:shorter] == theirs[:shorter]:
                    raise config.error(
                        f"public names {spec.namespace}/<repository> would overlap those of upstream "
                        f"\"{other.name}\" ({other.namespace}/<repository>): every public name belongs to one "
                        "upstream (an upstream without a prefix is named by its name)", key, index,
                    )
            namespaces.append((mine, spec))


def url_problem(value: str, allow_path: bool = False) -> str | None:
    """What is wrong with an upstream-side URL option's value (None: nothing), e.g. "must look like ..."."""
    try:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return f"must look like https://host[:port], got {value!r}"
        if not allow_path and (parts.path not in ("", "/") or parts.query or parts.fragment):
            return f"takes no path or query, got {value!r}"
        Origin(parts.scheme, parts.hostname, parts.port)
    except ValueError as e:
        return f"is not a usable URL ({e}): {value!r}"
    return None


def redacted(url: str) -> str:
    """`url` with any user and password replaced by `***` (for error messages and logs)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    if "@" in rest:  # the last @ ends the credentials, even an unescaped @ or / in the password
        rest = "***@" + rest.rsplit("@", 1)[1]
    return f"{scheme}{sep}{rest}"


def egress_proxy_problem(value: str) -> str | None:
    """What is wrong with an --egress-proxy URL (None: nothing). Never shows its credentials."""
    shown = redacted(value)
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        return f"must look like http://[user:password@]host:port, got {shown!r}"
    if parts.scheme == "https":
        return (f"https:// proxies are not supported (the proxy is spoken to in plain HTTP; CONNECT tunnels "
                f"carry the TLS): use http://, got {shown!r}")
    if parts.scheme != "http" or not parts.hostname:
        return f"must look like http://[user:password@]host:port, got {shown!r}"
    if port is None:
        return f"needs a port (http://host:port), got {shown!r}"
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return f"takes no path or query, got {shown!r}"
    return None
