"""Strict HTTP/1.1 message heads and body framing for the relay.

This parser is the proxy's security boundary: anything a careful server would refuse
(obs-fold, repeated or conflicting Content-Length, Transfer-Encoding other than chunked,
Content-Length together with Transfer-Encoding, bad chunk sizes, oversized heads) raises
`BadMessage`, so one client's bytes can never be read as another request. Bodies are not
decoded: framing is tracked so the raw bytes can be passed through unchanged.
"""

from __future__ import annotations

import re
from typing import Iterator

__all__ = [
    "BadMessage", "BodyReader", "CHUNKED", "Fields", "Head", "LENGTH", "MAX_HEAD", "METHODS", "NO_BODY",
    "REASONS", "UNTIL_CLOSE", "parse_request_head", "parse_response_head", "serialize_head", "split_head",
    "status_line",
]

MAX_HEAD = 64 * 1024
MAX_FIELDS = 128
MAX_CHUNK_LINE = 4096

# RFC 9110 token characters; field values may hold visible characters, SP and HTAB
# (obs-text allowed) but never CR, LF or NUL.
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_FIELD = re.compile(rb"(" + _TOKEN + rb"):[ \t]*([^\x00\r\n]*?)[ \t]*\Z")
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") (/[!-~]*) HTTP/(1\.[01])\Z")
_STATUS_LINE = re.compile(rb"HTTP/(1\.[01]) ([1-9][0-9][0-9])(?: ([^\x00\r\n]*))?\Z")
_DIGITS = re.compile(rb"[0-9]{1,19}\Z")
# RFC 9112 7.1.1: chunk-ext = *( BWS ";" BWS ext-name [ BWS "=" BWS ext-val ] )
_EXT = (
    rb"(?:[ \t]*;[ \t]*" + _TOKEN + rb"(?:[ \t]*=[ \t]*(?:" + _TOKEN
    + rb'|"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t !-~\x80-\xff])*"))?)*'
)
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})" + _EXT + rb"\Z")

METHODS = frozenset(
    {b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS"}
)


class BadMessage(Exception):
    """A message that must be refused; `status` is what a server answers."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


# Body framing kinds.
NO_BODY = 0
LENGTH = 1
CHUNKED = 2
UNTIL_CLOSE = 3  # responses only


class Head:
    """A parsed request or response head; field names are kept lower-cased beside the raw ones.

    The parser also fills an index from lower-cased name to value, so the dozen or so lookups
    each request makes (framing, routing, the gate, the access line) are dict lookups rather
    than scans of `fields`; `fields` is read-only once parsed.
    """

    __slots__ = (
        "method",
        "target",
        "version",
        "status",
        "fields",
        "framing",
        "length",
        "_first",
        "_all",
        "_tokens",
    )

    def __init__(self) -> None:
        self.method = b""
        self.target = b""
        self.version = b"1.1"
        self.status = 0
        # (lower-cased name, name as sent, value)
        self.fields: list[tuple[bytes, bytes, bytes]] = []
        self.framing = NO_BODY
        self.length = 0
        self._first: dict[bytes, bytes] = {}  # lower-cased name -> its first value
        self._all: dict[bytes, list[bytes]] | None = None  # every value, only when a name repeats
        self._tokens: frozenset[bytes] | None = None

    def _index(self) -> None:
        # first value wins for get(); a repeated name (rare) also gets the list of all its values
        fields = self.fields
        first = {ln: v for ln, _, v in reversed(fields)}
        self._first = first
        if len(first) != len(fields):
            every: dict[bytes, list[bytes]] = {}
            for ln, _, v in fields:
                every.setdefault(ln, []).append(v)
            self._all = every

    def get(self, lname: bytes) -> bytes | None:
        return self._first.get(lname)

    def get_all(self, lname: bytes) -> list[bytes]:
        every = self._all
        if every is not None:
            return list(every.get(lname, ()))
        v = self._first.get(lname)
        return [] if v is None else [v]

    def connection_tokens(self) -> frozenset[bytes]:
        tokens = self._tokens
        if tokens is None:
            found: set[bytes] = set()
            for value in self.get_all(b"connection"):
                for t in value.split(b","):
                    t = t.strip().lower()
                    if t:
                        found.add(t)
            tokens = self._tokens = frozenset(found)
        return tokens

    def keep_alive(self) -> bool:
        tokens = self.connection_tokens()
        if self.version == b"1.0":
            return b"keep-alive" in tokens
        return b"close" not in tokens


_TOKEN_BYTES = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# One field line, matched only at the start of a line (after an LF). `[^\r]*` rather than
# `[^\x00\r\n]*` because sre scans a single negated byte in a tight loop (1.7x faster on
# a real head); NUL and bare LF are refused by the checks in _parse_block instead.
_PAIR = re.compile(rb"(?<=\n)(" + _TOKEN + rb"):([^\r]*)\r\n")


def _parse_block(text: bytes, start: int, head: Head) -> None:
    """The fields of `text` (a head plus a final CRLF) from `start`, where the second line begins.

    Every line that matches _PAIR is a well-formed field: when there is no bare LF and no NUL
    and the matches are as many as the lines (none failed), the head is good and they are its
    fields, read in C. Otherwise the line-by-line path finds and names the fault.
    """
    lines = text.count(b"\r\n", start)
    # a bare LF first: _PAIR's value runs to the next CR, so LFs inside a line would let one
    # attempt scan many lines, and a head of short bare-LF lines would take quadratic time
    if text.count(b"\n", start) != lines or b"\x00" in text or len(pairs := _PAIR.findall(text, start)) != lines:
        _parse_fields(text[start:-2].split(b"\r\n") if start < len(text) else [], head)
    else:
        if len(pairs) > MAX_FIELDS:
            raise BadMessage("too many header fields", 431)
        head.fields = [(n.lower(), n, v.strip(b" \t")) for n, v in pairs]
    head._index()


def _parse_fields(lines: list[bytes], head: Head) -> None:
    # the line-by-line path, for blocks _BLOCK refuses: finds the first fault and names it
    if len(lines) > MAX_FIELDS:
        raise BadMessage("too many header fields", 431)
    fields = head.fields
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not name or name.translate(None, _TOKEN_BYTES):
            if line[:1] in (b" ", b"\t"):
                raise BadMessage("obsolete line folding is not accepted")
            raise BadMessage("malformed header field")
        if b"\x00" in value or b"\r" in value or b"\n" in value:
            raise BadMessage("malformed header field")
        fields.append((name.lower(), name, value.strip(b" \t")))


def _framing(head: Head, is_request: bool) -> None:
    lengths = head.get_all(b"content-length")
    codings = head.get_all(b"transfer-encoding")
    if codings:
        if lengths:
            raise BadMessage("both Content-Length and Transfer-Encoding")
        # no strip(): bytes.strip() also eats \x0b and \x0c, which would let
        # "Transfer-Encoding: \x0bchunked" through (the field regex already trims SP/HTAB)
        if len(codings) != 1 or codings[0].lower() != b"chunked":
            # a client error, not ours: 501 is a 5xx, which alerts count against the proxy
            raise BadMessage("only Transfer-Encoding: chunked is accepted")
        if head.version == b"1.0":
            raise BadMessage("Transfer-Encoding in an HTTP/1.0 message")
        head.framing = CHUNKED
        return
    if lengths:
        if len(lengths) != 1 or _DIGITS.match(lengths[0]) is None:
            raise BadMessage("invalid or repeated Content-Length")
        head.length = int(lengths[0])
        head.framing = LENGTH if head.length else NO_BODY
        return
    head.framing = NO_BODY if is_request else UNTIL_CLOSE


def split_head(buf: bytes, scanned: int = 0) -> tuple[bytes, int] | None:
    """Find the end of a head in `buf`: (head bytes without the blank line, bytes used).

    `scanned` is how much of `buf` an earlier call already searched, so a head that
    arrives a byte at a time costs linear, not quadratic, time. A line ending in a bare LF
    is refused as soon as it arrives: such a head never ends in CRLF CRLF, and waiting for
    it would only turn a malformed message into a timeout.
    """
    end = buf.find(b"\r\n\r\n", max(0, scanned - 3))
    if end < 0:
        if len(buf) > MAX_HEAD:
            raise BadMessage("message head too large", 431)
        lf = buf.find(b"\n", scanned)
        while lf >= 0:
            if lf == 0 or buf[lf - 1] != 13:
                raise BadMessage("bare LF in message head")
            lf = buf.find(b"\n", lf + 1)
        return None
    if end > MAX_HEAD:
        raise BadMessage("message head too large", 431)
    return buf[:end], end + 4


def _split_first(raw: bytes) -> tuple[bytes, bytes, int]:
    # (first line, the head plus a final CRLF, where the fields begin in it: its length when none)
    eol = raw.find(b"\r\n")
    if eol < 0:
        return raw, b"", 0
    return raw[:eol], raw + b"\r\n", eol + 2


def parse_request_head(raw: bytes) -> Head:
    line, text, start = _split_first(raw)
    m = _REQUEST_LINE.match(line)
    if m is None:
        raise BadMessage("malformed request line")
    head = Head()
    head.method, head.target, head.version = m.groups()
    if head.method not in METHODS:
        raise BadMessage("method not supported", 405)  # with Allow: METHODS (server.ClientConnection)
    _parse_block(text, start, head)
    hosts = head.get_all(b"host")
    if len(hosts) > 1 or (head.version == b"1.1" and not hosts):
        raise BadMessage("exactly one Host field is required")
    _framing(head, True)
    return head


def parse_response_head(raw: bytes, request_method: bytes) -> Head:
    line, text, start = _split_first(raw)
    m = _STATUS_LINE.match(line)
    if m is None:
        raise BadMessage("malformed status line", 502)
    head = Head()
    head.version = m.group(1)
    head.status = int(m.group(2))  # the reason phrase is checked by the pattern, then ignored
    try:
        _parse_block(text, start, head)
        _framing(head, False)
    except BadMessage as e:
        raise BadMessage(e.reason, 502) from None
    if (
        request_method == b"HEAD"
        or head.status < 200
        or head.status in (204, 304)
    ):
        head.framing = NO_BODY
        head.length = 0
    return head


Fields = list[tuple[bytes, bytes]]
"""Header fields to send, as (name, value), names as they go on the wire."""

REASONS = {
    100: b"Continue", 200: b"OK", 201: b"Created", 202: b"Accepted", 204: b"No Content",
    206: b"Partial Content", 301: b"Moved Permanently", 302: b"Found", 303: b"See Other",
    307: b"Temporary Redirect", 308: b"Permanent Redirect", 400: b"Bad Request",
    401: b"Unauthorized", 403: b"Forbidden", 404: b"Not Found", 405: b"Method Not Allowed",
    408: b"Request Timeout", 411: b"Length Required", 413: b"Payload Too Large",
    416: b"Range Not Satisfiable", 429: b"Too Many Requests",
    431: b"Request Header Fields Too Large", 500: b"Internal Server Error",
    501: b"Not Implemented", 502: b"Bad Gateway", 503: b"Service Unavailable",
    504: b"Gateway Timeout", 505: b"HTTP Version Not Supported",
}


def status_line(status: int, unknown: bytes = b"Unknown") -> bytes:
    """`HTTP/1.1 <status> <reason>`; `unknown` is the reason for a status missing from REASONS."""
    return b"HTTP/1.1 %d " % status + REASONS.get(status, unknown)


def serialize_head(first_line: bytes, fields: Iterator[tuple[bytes, bytes]] | Fields) -> bytes:
    parts = [first_line]
    for name, value in fields:
        parts.append(name + b": " + value)
    parts.append(b"\r\n")
    return b"\r\n".join(parts)


class BodyReader:
    """Tracks where a body ends in a byte stream, without copying or decoding it.

    `feed(data, offset)` returns how many bytes starting at `offset` belong to the body;
    `done` turns true at its end. With `dechunk=True`, `payload` receives the decoded chunk
    data instead (for HTTP/1.0 clients, which cannot read chunked framing).
    """

    __slots__ = ("framing", "remaining", "done", "_state", "_line", "_dechunk", "payload")

    # chunked states
    _SIZE, _DATA, _DATA_CRLF, _TRAILER = range(4)

    def __init__(self, framing: int, length: int = 0, dechunk: bool = False) -> None:
        self.framing = framing
        self.remaining = length
        self.done = framing == NO_BODY
        self._state = self._SIZE
        self._line = b""
        self._dechunk = dechunk
        self.payload: list[bytes] = []

    def dechunk_on(self) -> None:
        """From now on, decoded chunk data goes to `payload`."""
        self._dechunk = True

    def feed(self, data: bytes, offset: int = 0) -> int:
        if self.done:
            return 0
        n = len(data) - offset
        if self.framing == LENGTH:
            if n >= self.remaining:
                n = self.remaining
                self.remaining = 0
                self.done = True
            else:
                self.remaining -= n
            return n
        if self.framing == UNTIL_CLOSE:
            return n
        return self._feed_chunked(data, offset)

    def _feed_chunked(self, data: bytes, start: int) -> int:
        i = start
        end = len(data)
        while i < end and not self.done:
            state = self._state
            if state == self._DATA:
                take = min(self.remaining, end - i)
                if self._dechunk:
                    self.payload.append(data[i : i + take])
                i += take
                self.remaining -= take
                if self.remaining == 0:
                    self._state = self._DATA_CRLF
                continue
            # line-oriented states: size line, CRLF after data, trailer lines
            nl = data.find(b"\n", i)
            if nl < 0:
                self._line += data[i:end]
                if len(self._line) > MAX_CHUNK_LINE:
                    raise BadMessage("chunk line too long")
                return end - start
            line = self._line + data[i:nl + 1]
            self._line = b""
            i = nl + 1
            if len(line) > MAX_CHUNK_LINE:
                raise BadMessage("chunk line too long")
            if not line.endswith(b"\r\n"):
                raise BadMessage("bare LF in chunked body")
            line = line[:-2]
            if state == self._SIZE:
                m = _CHUNK_SIZE.match(line)
                if m is None:
                    raise BadMessage("invalid chunk size")
                size = int(m.group(1), 16)
                if size == 0:
                    self._state = self._TRAILER
                else:
                    self.remaining = size
                    self._state = self._DATA
            elif state == self._DATA_CRLF:
                if line:
                    raise BadMessage("chunk data longer than its size")
                self._state = self._SIZE
            else:  # trailer section: ends at an empty line
                if not line:
                    self.done = True
                elif line[:1] in (b" ", b"\t") or _FIELD.match(line) is None:
                    raise BadMessage("malformed trailer field")
        return i - start
