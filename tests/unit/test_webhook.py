"""access/webhook.py: the authorization webhook's verdicts, cache and failures, on a task.Clock."""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from ecr_twisted.access.credentials import Credentials, parse_authorization
from ecr_twisted.access.webhook import WebhookAuthorizer


def result_of(value: Any) -> Any:
    """The outcome of a value-or-Deferred that has already fired (fails the test if it has not)."""
    out: list[Any] = []
    maybeDeferred(lambda: value).addBoth(out.append)
    assert out, "the Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


class FakePost:
    """The webhook transport: records bodies, hands out Deferreds the test fires."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.calls: list[Deferred[tuple[int, bytes]]] = []

    def __call__(self, body: bytes) -> Deferred[tuple[int, bytes]]:
        self.bodies.append(json.loads(body))
        self.calls.append(Deferred())
        return self.calls[-1]


def webhook(clock: Clock, ttl: float = 60) -> tuple[WebhookAuthorizer, FakePost, list[str]]:
    post = FakePost()
    errors: list[str] = []
    return WebhookAuthorizer(post, clock, ttl=ttl, on_error=errors.append), post, errors


ALICE = Credentials("basic", "alice", "pw1")


@pytest.mark.parametrize("answer, verdict", [
    ({"allow": True}, "allow"), ({"allow": False}, "deny"),
    ({"allow": False, "authenticated": False}, "unauthenticated"), ({"allow": True, "authenticated": False}, "allow"),
])
def test_verdicts(answer: dict[str, Any], verdict: str) -> None:
    authz, post, errors = webhook(Clock())
    d = authz.decide(ALICE, "pull", "team/app", "v1")
    post.calls[0].callback((200, json.dumps(answer).encode()))
    assert result_of(d) == verdict and errors == []


@pytest.mark.parametrize("outcome", [(500, b'{"allow": true}'), (200, b"not json"), (200, b'{"deny": true}'),
                                     (200, b'{"allow": "yes"}'), (200, b"[true]"),
                                     Failure(ConnectionRefusedError("webhook.local"))])
def test_unusable_answers_are_unavailable_and_not_cached(outcome: Any) -> None:
    authz, post, errors = webhook(Clock())
    d = authz.decide(ALICE, "pull", "team/app", None)
    post.calls[0].callback(outcome) if isinstance(outcome, tuple) else post.calls[0].errback(outcome)
    assert result_of(d) == "unavailable" and len(errors) == 1
    again = authz.decide(ALICE, "pull", "team/app", None)
    assert isinstance(again, Deferred) and len(post.calls) == 2  # asked again, not remembered


def test_deeply_nested_answer_is_unavailable_not_stuck() -> None:
    """A webhook answering 64 KiB of "[" (http_post's bound) must not wedge the question forever."""
    authz, post, errors = webhook(Clock())
    d = authz.decide(ALICE, "pull", "team/app", None)
    post.calls[0].callback((200, b"[" * 65536))
    assert result_of(d) == "unavailable" and len(errors) == 1
    authz.decide(ALICE, "pull", "team/app", None)
    assert len(post.calls) == 2  # not left waiting on the dead call


def test_answers_are_cached_for_ttl() -> None:
    clock = Clock()
    authz, post, _ = webhook(clock, ttl=30)
    d = authz.decide(ALICE, "push", "team/app", "v1")
    clock.advance(5)
    post.calls[0].callback((200, b'{"allow": true}'))
    assert result_of(d) == "allow"
    clock.advance(29.9)
    assert authz.decide(ALICE, "push", "team/app", "v1") == "allow" and len(post.calls) == 1
    clock.advance(0.1)  # ttl counts from the answer, not the question
    assert isinstance(authz.decide(ALICE, "push", "team/app", "v1"), Deferred) and len(post.calls) == 2


def test_concurrent_identical_questions_share_one_post() -> None:
    authz, post, _ = webhook(Clock())
    first, second = authz.decide(ALICE, "pull", "r", "t"), authz.decide(ALICE, "pull", "r", "t")
    other = authz.decide(ALICE, "pull", "r", "other-tag")
    assert len(post.calls) == 2
    post.calls[0].callback((200, b'{"allow": false}'))
    assert (result_of(first), result_of(second)) == ("deny", "deny")
    assert isinstance(other, Deferred) and not other.called


def test_question_body_and_cache_key_cover_the_secret() -> None:
    authz, post, _ = webhook(Clock())
    authz.decide(ALICE, "pull", "team/app", "v1")
    authz.decide(Credentials("basic", "alice", "pw2"), "pull", "team/app", "v1")
    authz.decide(parse_authorization(b"Bearer tok.en"), "delete", "team/app", None)
    assert post.bodies == [
        {"user": "alice", "password": "pw1", "action": "pull", "repository": "team/app", "tag": "v1"},
        {"user": "alice", "password": "pw2", "action": "pull", "repository": "team/app", "tag": "v1"},
        {"user": None, "token": "tok.en", "action": "delete", "repository": "team/app", "tag": None},
    ]
    post.calls[0].callback((200, b'{"allow": true}'))
    post.calls[1].callback((200, b'{"allow": false}'))
    assert authz.decide(Credentials("basic", "alice", "pw2"), "pull", "team/app", "v1") == "deny"
    assert authz.decide(ALICE, "pull", "team/app", "v1") == "allow"
