"""The tests' own waiting (nilmd.testing.wait_for): what a failure in CI shows is all we get."""
from __future__ import annotations

import pytest

from nilmd.testing import wait_for


def test_a_failed_wait_shows_what_the_message_function_reads_at_the_failure():
    log = ["starting"]
    reads = []

    def message():
        reads.append(len(log))
        return "the daemon to subscribe\n" + "\n".join(log)

    def condition():
        log.append("subscribed too late")  # what a daemon writes while the test waits
        return False

    with pytest.raises(AssertionError) as e:
        wait_for(condition, 0.2, message, interval=0.01)
    assert reads == [len(log)], "the message is read once, at the failure, not before the wait"
    assert "waiting for: the daemon to subscribe\nstarting\nsubscribed too late" in str(e.value)


def test_a_wait_that_succeeds_never_builds_its_message_and_a_string_still_works():
    def message():
        raise AssertionError("the message was built for a wait that succeeded")
    assert wait_for(lambda: 42, 1, message) == 42
    with pytest.raises(AssertionError, match="waiting for: a plain text"):
        wait_for(lambda: None, 0.05, "a plain text", interval=0.01)
