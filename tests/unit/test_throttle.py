"""access/throttle.py: the failed-login throttle."""

from __future__ import annotations

from ecr_twisted.access.throttle import LoginThrottle


def test_free_failures_then_doubling_penalty_capped() -> None:
    t = LoginThrottle(free=3, window=100, max_penalty=8)
    for _ in range(2):
        t.failed("1.2.3.4", 10)
    assert t.wait("1.2.3.4", 10) == 0
    t.failed("1.2.3.4", 10)
    assert t.wait("1.2.3.4", 10) == 1 and t.wait("1.2.3.4", 10.25) == 0.75 and t.wait("1.2.3.4", 11) == 0
    penalties = []
    for _ in range(5):
        t.failed("1.2.3.4", 20)
        penalties.append(t.wait("1.2.3.4", 20))
    assert penalties == [2, 4, 8, 8, 8]
    assert t.wait("5.6.7.8", 20) == 0  # other addresses are unaffected


def test_penalty_stays_capped_however_many_failures() -> None:
    # a patient guesser gets one try per max_penalty and never lets the window lapse
    t = LoginThrottle(free=5, window=900, max_penalty=60)
    for _ in range(1100):
        t.failed("1.2.3.4", 0)
    assert t.wait("1.2.3.4", 0) == 60


def test_failures_decay_after_the_window_and_a_success_takes_back_one() -> None:
    t = LoginThrottle(free=1, window=100, max_penalty=60)
    t.failed("a", 0)
    t.failed("a", 0)
    assert t.wait("a", 100) == 0 and t.wait("a", 1) == 1  # expired penalty, record still there
    assert t.wait("a", 100.5) == 0
    t.failed("a", 100.5)
    assert t.wait("a", 100.5) == 1  # counted from one again, not three
    t.failed("b", 0)
    t.failed("b", 50)
    t.failed("b", 151)  # more than `window` after the last failure: starts over
    assert t.wait("b", 151) == 1
    t.forgive("b")
    assert t.wait("b", 151) == 0  # one failure left: under `free` again
    t.failed("c", 0)
    t.failed("c", 0)
    t.failed("c", 0)
    t.forgive("c")  # logging in with one's own account does not wipe guesses at another's
    assert t.wait("c", 0) == 2


def test_size_bound_evicts_the_least_recent_failure() -> None:
    t = LoginThrottle(free=1, window=100, max_penalty=60, size=2)
    t.failed("a", 0)
    t.failed("b", 0)
    t.failed("a", 0)  # a is now the most recent
    t.failed("c", 0)
    assert (t.wait("a", 0), t.wait("b", 0), t.wait("c", 0)) == (2, 0, 1)
