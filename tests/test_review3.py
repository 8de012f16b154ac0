"""Review 3: failing tests for faults found in the reload-to-sinks and transactional alerts-stage
changes. Each test names the fault it shows."""

from __future__ import annotations

import logging
import time

from monitord.alerts.engine import AlertEngine
from monitord.alerts.stage import AlertsStage
from monitord.stage import Channel
from monitord.types import Event
from tests.conftest import require, wait_until
from tests.test_review import rule, scored


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
        assert wait_until(lambda: len(out) == 1, 5)
        inbox.put(scored(1.5, 0.9))
        inbox.close()
        out.close()
        assert stage.join(3), "the stage never ended"
    finally:
        stage.stop()
        stage.join(2)
    assert stage.error is None


# --- MQTT ---------------------------------------------------------------------------------------

def new_rule_onset(seq: int) -> Event:
    return Event(kind="alert", source="rec", rule="loud", label="tone", phase="onset", score=0.9,
                 time="2026-01-01T00:00:00.000Z", host="h", seq=seq, id=f"id{seq}")


def test_an_onset_of_a_rule_added_by_a_reload_sets_its_state_on_even_when_it_is_sent_in_the_same_turn(tmp_path):
    """The sink's thread took new rules at the top of its turn, then sent every queued event. A reload
    (on_rules) and an onset of the new rule handed over after that, during the sending, were sent
    first: the pair was not in ``states`` yet, so no ON; the next turn took the rules and published
    the new entity's state OFF. Home Assistant showed the alert off while it was on."""
    require("paho.mqtt.client", "pip install 'monitord[mqtt]'")
    from monitord.config import RuleConfig
    from tests.test_review2 import FakeBroker, make_sink

    broker = FakeBroker()
    broker.up = True
    sink = make_sink(tmp_path, broker, None, [], discovery=True)
    rules = (RuleConfig(id="tone", model="m", label="tone", threshold=0.5),
             RuleConfig(id="loud", model="m", label="tone", threshold=0.5))
    pump, reloaded = sink._pump, []

    def pump_with_a_reload_meanwhile():  # the output thread, while the sink's thread is sending
        if sink.connected.is_set() and not reloaded:
            reloaded.append(True)
            sink.on_rules(rules)
            sink.deliver(new_rule_onset(1))
        pump()

    sink._pump = pump_with_a_reload_meanwhile
    sink.start()
    try:
        assert wait_until(lambda: 1 in broker.event_seqs() and any(t.endswith("/rec_loud/config") for t, p, r in broker.published), 10)
        time.sleep(0.5)  # a turn or two more
    finally:
        sink.stop(1.0)
    states = [p for t, p, r in broker.published if t == "m/rec/loud/state"]
    assert states and states[-1] == "ON", f"the new rule's retained state after its onset: {states}"


def test_a_stale_retained_topic_whose_emptying_was_lost_with_the_connection_is_emptied_at_the_next_one(tmp_path):
    """The sink published an empty retained message for each topic it no longer has, then saved the
    list without them at once, before the broker acknowledged anything. A connection lost in between
    (the empty message dies with the discarded client) left the topic on the broker for ever, and
    nothing remembered it: Home Assistant kept the entity of a removed rule. A topic leaves the list
    once its emptying is acknowledged."""
    require("paho.mqtt.client", "pip install 'monitord[mqtt]'")
    import json

    from tests.test_review2 import FakeBroker, _Info, make_sink

    stale = "m/rec/gone/state"
    state_file = tmp_path / "events.jsonl.mqtt-state.json"
    state_file.write_text(json.dumps({"acked_seq": 0, "retained": ["m/rec/tone/state", stale]}) + "\n")

    class LossyBroker(FakeBroker):
        lose_empties = True

        def factory(self):
            client = super().factory()
            publish = client.publish

            def lossy(topic, payload, qos=0, retain=False):
                if self.lose_empties and payload in (b"", ""):
                    self.mid += 1
                    self.up = False  # the connection goes down before the broker has it
                    return _Info(self.mid)
                return publish(topic, payload, qos, retain)

            client.publish = lossy
            return client

    broker = LossyBroker()
    broker.up = True
    sink = make_sink(tmp_path, broker, None, [])
    sink.start()
    try:
        assert wait_until(lambda: not broker.up, 5)  # the first connection lost the emptying
        assert wait_until(lambda: not sink.connected.is_set(), 5)
        broker.lose_empties, broker.up = False, True
        assert wait_until(lambda: (stale, "", True) in broker.published, 10), \
            f"never emptied; the state file says {state_file.read_text()}"
        assert wait_until(lambda: stale not in json.loads(state_file.read_text())["retained"], 5)
    finally:
        sink.stop(1.0)


# --- the output stage ---------------------------------------------------------------------------

def test_a_reload_reaches_a_sink_without_on_rules_without_an_error(caplog):
    """``on_rules`` came with this change; a sink written to the Protocol before it (the benchmark's
    recorder, sinks that tests inject) has none: every reload logged an ERROR with a traceback
    ("sink bench failed to take the new rules") for a sink that has nothing to do with rules."""
    from monitord.config import RuleConfig
    from monitord.output.stage import OutputStage
    from monitord.types import RulesChange

    class OldSink:
        name = "old"

        def start(self): pass

        def deliver(self, event): pass

        def stop(self, timeout): pass

    class NewSink(OldSink):
        name = "new"
        rules = None

        def on_rules(self, rules):
            self.rules = rules

    new = NewSink()
    inbox = Channel(10, "output")
    stage = OutputStage(inbox, None, "h", {}, sinks=[OldSink(), new])
    rules = (RuleConfig(id="tone", model="m", label="tone", threshold=0.5),)
    inbox.put(RulesChange(rules))
    inbox.close()
    with caplog.at_level(logging.WARNING):
        stage.start()
        assert stage.join(5) and stage.error is None
    assert new.rules == rules
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_a_state_file_whose_retained_list_is_bad_neither_stops_the_sink_nor_loses_events(tmp_path):
    """The state file's ``retained`` list was trusted as any strings: a topic that cannot be published
    (a wildcard, an empty name: a file edited by hand or damaged) made paho raise at every connection,
    so the sink never came up and sent nothing. A list that is no list of topics made the whole file
    refused: the acknowledged seq with it, so the events after it were never sent. A bad list is
    now left out (said), the seq kept."""
    require("paho.mqtt.client", "pip install 'monitord[mqtt]'")
    import json

    from monitord.output.eventlog import EventLog
    from tests.test_review2 import FakeBroker, make_sink, status_event

    class StrictBroker(FakeBroker):
        def factory(self):
            client = super().factory()
            publish = client.publish

            def strict(topic, payload, qos=0, retain=False):
                if not topic or "#" in topic or "+" in topic:  # as paho does
                    raise ValueError("Publish topic cannot contain wildcards.")
                return publish(topic, payload, qos, retain)

            client.publish = strict
            return client

    for retained in (["m/#"], [""], "m/rec/tone/state"):
        d = tmp_path / str(len(list(tmp_path.iterdir())))
        d.mkdir()
        log = EventLog(d / "events.jsonl")
        log.open()
        for seq in (1, 2, 3):
            log.append(status_event(seq).to_json().encode())
        (d / "events.jsonl.mqtt-state.json").write_text(json.dumps({"acked_seq": 1, "retained": retained}) + "\n")
        broker = StrictBroker()
        broker.up = True
        sink = make_sink(d, broker, log, [])
        sink.start()
        try:
            assert wait_until(lambda: broker.event_seqs() == [2, 3], 5), (retained, broker.event_seqs())
        finally:
            sink.stop(1.0)
            log.close()


def test_a_reload_while_the_broker_is_away_brings_no_removed_entity_back_at_the_reconnect(tmp_path):
    """A reload removing a rule while the broker is down is taken at the next connection before
    anything retained goes out: the removed rule's discovery config is emptied, never published again."""
    require("paho.mqtt.client", "pip install 'monitord[mqtt]'")
    from monitord.config import RuleConfig
    from tests.test_review2 import FakeBroker, make_sink

    broker, statuses = FakeBroker(), []
    broker.up = True
    sink = make_sink(tmp_path, broker, None, statuses, discovery=True)
    config = "homeassistant/binary_sensor/monitord_h/rec_tone/config"

    def said(status: str) -> int:
        return sum(a[1] == status for a, k in list(statuses))

    sink.start()
    try:
        assert wait_until(lambda: said("mqtt_up") == 1, 10)  # (not a state the sink is in a moment before)
        broker.up = False
        assert wait_until(lambda: said("mqtt_down") >= 1, 10)  # the client is gone: the reload waits
        sink.on_rules((RuleConfig(id="loud", model="m", label="tone", threshold=0.5),))
        mark = len(broker.published)
        broker.up = True
        assert wait_until(lambda: said("mqtt_up") == 2, 10)  # connected again: what it publishes first is done
    finally:
        sink.stop(1.0)
    after = [(t, p) for t, p, r in broker.published[mark:] if t.startswith("homeassistant/")]
    assert [p for t, p in after if t == config] == [""], after  # emptied, and not published first
    assert any(t.endswith("/rec_loud/config") and p for t, p in after)
