"""The access policy as a decision table, path tricks included."""

import pytest

from ecr_twisted.access.policy import ANONYMOUS, PRESETS, Policy, PolicyError, Principal

POLICY = Policy.from_toml(
    """
[groups]
ci = ["jenkins"]
team-a = ["alice"]

[[rule]]
principals = ["*"]
actions = ["pull"]
repositories = ["public/*"]

[[rule]]
principals = ["group:team-a"]
actions = ["pull", "push"]
repositories = ["team-a/*"]

[[rule]]
principals = ["group:ci"]
actions = ["push"]
repositories = ["team-a/*"]
tags = ["release-*"]

[[rule]]
principals = ["user:bob"]
actions = ["pull"]
repositories = ["team-b/app"]
tags = ["stable"]

[[rule]]
principals = ["authenticated"]
actions = ["delete"]
repositories = ["scratch/*"]

[[rule]]
effect = "deny"
principals = ["*"]
actions = ["push"]
repositories = ["*"]
tags = ["latest"]
"""
)

ALICE, JENKINS, BOB, MALLORY = Principal("alice"), Principal("jenkins"), Principal("bob"), Principal("mallory")


@pytest.mark.parametrize(
    "who,action,repository,tag,allowed",
    [
        # public read for everyone, nothing else
        (ANONYMOUS, "pull", "public/base", "1.0", True),
        (ANONYMOUS, "pull", "public/base", None, True),
        (ANONYMOUS, "push", "public/base", "1.0", False),
        (ANONYMOUS, "pull", "team-a/app", "1.0", False),
        (MALLORY, "pull", "public/deep/nested", None, True),
        # a group's own namespace
        (ALICE, "pull", "team-a/app", "1.0", True),
        (ALICE, "push", "team-a/app", "1.0", True),
        (ALICE, "push", "team-a/app", None, True),
        (ALICE, "pull", "team-b/app", None, False),
        (ALICE, "delete", "team-a/app", None, False),
        # latest may not be overwritten, by anyone
        (ALICE, "push", "team-a/app", "latest", False),
        (JENKINS, "push", "team-a/app", "latest", False),
        # tag-limited grants: only those tags by tag; blobs/uploads/digests are repository checks
        (JENKINS, "push", "team-a/app", "release-1.2", True),
        (JENKINS, "push", "team-a/app", "feature-x", False),
        (JENKINS, "push", "team-a/app", None, True),
        (JENKINS, "pull", "team-a/app", "release-1.2", False),
        (BOB, "pull", "team-b/app", "stable", True),
        (BOB, "pull", "team-b/app", "nightly", False),
        (BOB, "pull", "team-b/app", None, True),
        (BOB, "pull", "team-b/other", None, False),
        # delete needs its own grant
        (MALLORY, "delete", "scratch/tmp", None, True),
        (ANONYMOUS, "delete", "scratch/tmp", None, False),
        # default deny, unknown actions
        (MALLORY, "push", "elsewhere/app", "1", False),
        (ALICE, "admin", "team-a/app", None, False),
        # path tricks never match a rule
        (ALICE, "pull", "team-a/../team-b/app", None, False),
        (ANONYMOUS, "pull", "public/../team-a/app", None, False),
        (ALICE, "pull", "team-a%2f..%2fteam-b", None, False),
        (ANONYMOUS, "pull", "Public/base", None, False),
        (ANONYMOUS, "pull", "public//base", None, False),
        (ANONYMOUS, "pull", "/public/base", None, False),
        (ANONYMOUS, "pull", "public/base/", None, False),
        (ANONYMOUS, "pull", "public/" + "a" * 260, None, False),
        (ANONYMOUS, "pull", "public/base", "../latest", False),
        # names with API words are just names
        (ALICE, "pull", "team-a/blobs", None, True),
        (ALICE, "pull", "team-a/manifests/x", None, True),
    ],
)
def test_decisions(who: Principal, action: str, repository: str, tag: str | None, allowed: bool) -> None:
    assert POLICY.allows(who, action, repository, tag) is allowed


def test_only_the_open_policy_allows_everything() -> None:
    assert Policy.preset("open").allows_everything()
    assert not Policy.preset("public-read").allows_everything() and not Policy.preset("private").allows_everything()
    assert not POLICY.allows_everything() and not Policy([]).allows_everything()
    with_deny = Policy.from_toml(PRESETS["open"] + '[[rule]]\neffect = "deny"\nprincipals = ["*"]\nactions = ["push"]\n'
                                 'repositories = ["*"]\ntags = ["latest"]\n')
    assert not with_deny.allows_everything()


def test_deleting_by_digest_needs_every_tag_rule_to_agree() -> None:
    """A delete by digest removes every tag of the image: tag-limited rules cannot grant it, and
    tag-limited denies block it."""
    policy = Policy.from_toml(
        '[[rule]]\nprincipals = ["user:dev"]\nactions = ["delete"]\nrepositories = ["app"]\ntags = ["dev-*"]\n'
        '[[rule]]\nprincipals = ["user:ops"]\nactions = ["delete"]\nrepositories = ["app"]\n'
        '[[rule]]\neffect = "deny"\nprincipals = ["*"]\nactions = ["delete"]\nrepositories = ["app"]\n'
        'tags = ["prod-*"]\n'
    )
    dev, ops = Principal("dev"), Principal("ops")
    assert policy.allows(dev, "delete", "app", "dev-1") and not policy.allows(dev, "delete", "app", "prod-1")
    assert not policy.allows(dev, "delete", "app", None, every_tag=True)
    assert policy.allows(ops, "delete", "app", "other") and not policy.allows(ops, "delete", "app", "prod-1")
    assert not policy.allows(ops, "delete", "app", None, every_tag=True)  # the prod deny speaks for all tags


def test_presets() -> None:
    public = Policy.preset("public-read")
    assert public.allows(ANONYMOUS, "pull", "any/repo") and not public.allows(ANONYMOUS, "push", "any/repo")
    assert public.allows(ALICE, "push", "any/repo", "1.0")
    private = Policy.preset("private")
    assert not private.allows(ANONYMOUS, "pull", "any/repo") and private.allows(ALICE, "pull", "any/repo")
    assert Policy([]).allows(ALICE, "pull", "any/repo") is False
    with pytest.raises(PolicyError, match="unknown preset"):
        Policy.preset("everything")


@pytest.mark.parametrize(
    "text,message",
    [
        ("[[rule]\n", "not valid TOML"),
        ("[users]\nx = 1\n", "unknown section"),
        ('[[rule]]\nactions = ["pull"]\nrepositories = ["*"]\n', "'principals' is required"),
        ('[[rule]]\nprincipals = ["root"]\nactions = ["pull"]\nrepositories = ["*"]\n', "unknown principal"),
        ('[[rule]]\nprincipals = ["*"]\nactions = ["write"]\nrepositories = ["*"]\n', "unknown action"),
        ('[[rule]]\nprincipals = ["*"]\nactions = ["pull"]\nrepositories = []\n', "non-empty list"),
        ('[[rule]]\neffect = "maybe"\nprincipals = ["*"]\nactions = ["pull"]\nrepositories = ["*"]\n', "effect"),
        ('[[rule]]\nprincipal = ["*"]\nactions = ["pull"]\nrepositories = ["*"]\n', "unknown key"),
        ('[groups]\nci = "jenkins"\n', "lists of user names"),
    ],
)
def test_bad_policies_say_where(text: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        Policy.from_toml(text, "p.toml")


def test_policy_file_is_reread_on_change_and_a_broken_edit_keeps_the_last_good(tmp_path) -> None:
    import os

    from twisted.internet.task import Clock

    from ecr_twisted.access.policy import PolicyFile

    path = tmp_path / "policy.toml"
    path.write_text(PRESET_PUBLIC)
    clock = Clock()
    source = PolicyFile(str(path), clock)
    assert source.current().allows(ANONYMOUS, "pull", "app") and not source.current().allows(ANONYMOUS, "push", "app")

    def edit(text: str, mtime: int) -> None:
        path.write_text(text)
        os.utime(path, ns=(mtime * 10**9, mtime * 10**9))

    edit(PRESET_PUBLIC.replace('["pull"]', '["pull", "push"]'), 1_000)
    assert not source.current().allows(ANONYMOUS, "push", "app")  # checked at most once a second
    clock.advance(1)
    assert source.current().allows(ANONYMOUS, "push", "app")
    edit("[[rule]\n", 2_000)
    clock.advance(1)
    assert source.current().allows(ANONYMOUS, "push", "app")  # the broken edit is not applied
    path.unlink()
    clock.advance(1)
    assert source.current().allows(ANONYMOUS, "push", "app")


PRESET_PUBLIC = '[[rule]]\nprincipals = ["*"]\nactions = ["pull"]\nrepositories = ["*"]\n'


def test_remembered_answers_are_per_user_action_name_and_tag_and_bounded() -> None:
    """allows() remembers its answers (a Basic client asks the same question on every request):
    the same answers as worked out afresh, never one user's for another, and a bounded memory."""
    from ecr_twisted.access import policy as module

    p = Policy.from_toml(
        '[[rule]]\nprincipals = ["user:alice"]\nactions = ["pull", "push"]\nrepositories = ["team/*"]\n'
        '[[rule]]\neffect = "deny"\nprincipals = ["*"]\nactions = ["push"]\nrepositories = ["*"]\ntags = ["latest"]\n'
    )
    alice, bob = Principal("alice"), Principal("bob")
    questions = [
        (who, action, name, tag, every)
        for who in (alice, bob, ANONYMOUS)
        for action in ("pull", "push", "delete")
        for name in ("team/app", "other/app", "Team/App")
        for tag in (None, "latest", "v1")
        for every in (False, True)
    ]
    fresh = [p._allows(*q) for q in questions]
    assert [p.allows(*q) for q in questions] == fresh  # worked out, then remembered
    assert [p.allows(*q) for q in questions] == fresh  # answered from memory
    assert p.allows(alice, "push", "team/app", "v1") and not p.allows(bob, "push", "team/app", "v1")
    assert not p.allows(alice, "push", "team/app", "latest")
    for i in range(module._MAX_DECIDED + 10):
        p.allows(alice, "pull", f"team/app{i}")
    assert len(p._decided) <= module._MAX_DECIDED
