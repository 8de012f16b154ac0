"""Review 3: failing tests for faults found in the reload-to-sinks and transactional alerts-stage
changes. Each test names the fault it shows."""

from __future__ import annotations

import logging
import time

from monitord.alerts.engine import AlertEngine
from monitord.alerts.stage import AlertsStage
from monitord.stage import Channel
from monitord.types import Publication
from tests.test_review import rule, scored, wait_for


def test_an_alerts_stage_whose_output_channel_closed_does_not_spin_but_goes_on_to_its_end():
    """At shutdown the daemon closes the output channel once the alerts stage had 10 s to drain. A
    stage then waiting to hand on an event got False from ``put`` (closed) and kept its hand-on
    queue: the loop retried it at once, forever (a busy loop holding the GIL while the output stage
    drains), never reading its inbox to its end. What a closed channel refuses cannot go anywhere:
    it is dropped (and said), and the stage goes on to its end."""
    inbox, out = Channel(1000, "alerts"), Channel(1, "output")
    stage = AlertsStage(AlertEngine((rule(), rule(id="r2", release=0.5))), inbox, out, "host", {"clap": "clap-id"})
    inbox.put(scored(1.0, 0.9))  # two onsets: room for one
    stage.start()
    try:
        assert wait_for(lambda: len(out) == 1, 5)
        inbox.put(scored(1.5, 0.9))
        inbox.close()
        out.close()
        assert stage.join(3), "the stage never ended"
    finally:
        stage.stop()
        stage.join(2)
    assert stage.error is None
