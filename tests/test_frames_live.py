"""The live frame stream (issue #18, item 3): every 20 ms frame a stream's merge releases goes out in
exactly one event, whether a scored window, an unscored one (``merge_skip``) or the stream's end
(``merge_end``) released it; and a stream's published frames are ``classify --timeline``'s frames
for the same file, count and values."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from hypothesis import given, settings
from hypothesis import strategies as st

from monitord.alerts.engine import AlertEngine
from monitord.alerts.frames import FrameTracker, merge_windows
from monitord.alerts.stage import AlertsStage
from monitord.config import RuleConfig
from monitord.stage import Channel
from monitord.types import (Event, FrameScores, Outcome, Publication, Scores, ScoredWindow, StreamEnd, Verdict, Window,
                            WindowFacts)
from tests.conftest import AUDIO, REPO, free_port, monitord_cmd, shared_path, silence, write_wav
from tests.test_e2e import Subscriber
from tests.test_frames import most_central

HOP, OFFSET, RATE = 0.02, 0.0125, 16000
LABELS = ("a", "b", "c")
LENGTH_S, STEP_S = 2.0, 0.5


# --- the pure tracker and the alerts stage, on made-up frames -----------------------------------


def tagged(start: float, end: float, window_id: int) -> FrameScores:
    """A window's frames as an encoder places them; column 0 names the window, column 1 the frame,
    column 2 is the window's number over 1000 (a score that grows window by window)."""
    n = min(99, int(np.ceil(((end - start) - OFFSET) / HOP)))
    values = np.zeros((n, len(LABELS)), dtype=np.float32)
    values[:, 0] = window_id
    values[:, 1] = np.arange(n)
    values[:, 2] = window_id / 1000
    return FrameScores(start + OFFSET, HOP, values)


def window(source: str, start_s: float) -> Window:
    start = round(start_s * RATE)
    return Window(source, start, RATE, np.zeros(1, dtype=np.float32), round(LENGTH_S * RATE), 1000.0 + start_s,
                  1000.0 + start_s + LENGTH_S, WindowFacts(-20, -10, -25, 0.0, 0, 0.0))


# one op: (source, what) with what "scored" | "skipped" | "end" | "last" (an end-aligned scored window
# off the 0.5 s grid, then the stream's end, as the tiler cuts a file's tail)
OPS = st.lists(st.tuples(st.sampled_from(["x", "y"]), st.sampled_from(["scored", "scored", "skipped", "end", "last"]),
                         st.integers(1, 39)), min_size=1, max_size=40)


def play(ops):
    """The ops as windows per source: (source, start_s, frames or None), and (source, None, None) for a
    stream's end; also each source's streams as lists of their scored windows (the oracle's input)."""
    clock = {"x": 0.0, "y": 100.0}  # each source's next window start on the 0.5 s grid
    streams: dict[str, list[list]] = {"x": [[]], "y": [[]]}
    steps = []
    window_id = 0
    for source, what, shift in ops:
        start = clock[source]
        if what == "last":  # the tiler's end-aligned window: between the last grid start and the next
            start = clock[source] - STEP_S + shift * 0.0125
        if what != "end":
            frames = None
            if what != "skipped":
                window_id += 1
                frames = tagged(start, start + LENGTH_S, window_id)
                streams[source][-1].append((start, start + LENGTH_S, frames))
            steps.append((source, start, frames))
            clock[source] += STEP_S
        if what in ("end", "last"):
            steps.append((source, None, None))
            streams[source].append([])
            clock[source] += 10.0  # the next stream starts well after this one's last window
    return steps, streams


def scored_spans(steps) -> list:
    return [(start, start + LENGTH_S, frames) for _, start, frames in steps if frames is not None]


def expected_frames(streams, source: str) -> list[tuple[int, int]]:
    """(window id, frame) of every frame of each stream's curve, stream after stream, by brute force:
    a frame is kept from the scored window covering it whose centre is nearest (ties: the earlier)."""
    out = []
    for scored in streams[source]:
        kept = [(t, int(frames.values[j, 0]), j) for i, (_, _, frames) in enumerate(scored)
                for j, t in enumerate(frames.times.tolist()) if most_central(scored, t) == i]
        assert merge_windows(scored).times.tolist() == [t for t, _, _ in kept]  # the offline curve: the same
        out += [(w, j) for _, w, j in sorted(kept)]
    return out


def check_released(got: dict[str, list[tuple[float, int, int]]], streams) -> None:
    for source in ("x", "y"):
        frames = got.get(source, [])
        tags = [(w, j) for _, w, j in frames]
        times = [t for t, _, _ in frames]
        assert len(set(tags)) == len(tags), "a frame released twice"
        assert times == sorted(times) and len(set(times)) == len(times), "out of order, or an instant twice"
        assert tags == expected_frames(streams, source), "frames missing (or extra)"


@settings(max_examples=200, deadline=None)
@given(OPS)
def test_the_tracker_releases_every_frame_once_in_order_whatever_ends_its_stretch(ops):
    """Scored windows (merge_step), unscored ones (merge_skip) and stream ends (merge_end) in any
    order on two sources: the frames handed out are each stream's merged curve, each frame once."""
    tracker = FrameTracker([])
    steps, streams = play(ops)
    got: dict[str, list] = {}

    def take(source, curve):
        got.setdefault(source, []).extend((t, int(v[0]), int(v[1])) for t, v in zip(curve.times.tolist(), curve.values))

    for source, start, frames in steps:
        if start is None:
            released, _ = tracker.end(source)
            for r in released:
                assert r.source == source and r.model == "emo" and r.labels == LABELS
                take(source, r.curve)
            continue
        curve, _ = tracker.observe(source, "emo", start, start + LENGTH_S, frames, LABELS)
        take(source, curve)
    released, _ = tracker.end(None)  # the daemon stopping: what is still pending
    for r in released:
        take(r.source, r.curve)
    check_released(got, streams)


def run_stage(items, rules=(), scores_wanted=True, out_size: int = 100000) -> list[Event]:
    """An alerts stage fed ``items`` then closed (the daemon stopping); the events it handed on, in order."""
    inbox, out = Channel(100000, "alerts"), Channel(out_size, "output")
    stage = AlertsStage(AlertEngine(tuple(rules)), inbox, out, "host", {"emo": "emo-id"}, scores_wanted)
    for item in items:
        inbox.put(item)
    inbox.close()
    stage.start()
    got, give_up = [], time.monotonic() + 120  # a guard against a hang, not a measure of speed
    while not stage.join(0.05) or len(out):  # take them as they come: a full channel must not lose frames
        assert time.monotonic() < give_up, f"the alerts stage is stuck: {stage.state} {stage.error!r}"
        item = out.get(0.01)
        if isinstance(item, Publication):
            got.append(item.event)
    return got


def stage_items(steps, verdict: Verdict = Verdict.QUIET) -> list:
    items = []
    for source, start, frames in steps:
        if start is None:
            items.append(StreamEnd(source, 0.0))
            continue
        w = window(source, start)
        if frames is None:
            items.append(ScoredWindow(w, (Outcome("emo", verdict),)))
        else:
            probabilities = {label: 1 / 3 for label in LABELS}
            items.append(ScoredWindow(w, (Outcome("emo", Verdict.SCORED, Scores(w, "emo", "emo-id", probabilities, frames=frames)),)))
    return items


def published_frames(events: list[Event]) -> dict[str, list[tuple[float, int, int]]]:
    got: dict[str, list] = {}
    for e in events:
        frames = e.extra.get("frames")
        if frames is None:
            continue
        assert e.kind in ("scores", "frames") and e.topic == f"scores.{e.source}.emo"
        assert frames["labels"] == list(LABELS) and frames["hop_s"] == HOP and len(frames["times"]) == len(frames["values"]) > 0
        got.setdefault(e.source, []).extend((t, int(v[0]), int(v[1])) for t, v in zip(frames["times"], frames["values"]))
    return got


@settings(max_examples=60, deadline=None)
@given(OPS, st.sampled_from([Verdict.QUIET, Verdict.SAMPLED_OUT, Verdict.CASCADE, Verdict.FAILED]))
def test_every_released_frame_is_published_in_exactly_one_event(ops, verdict):
    """The alerts stage on the same windows: each frame in exactly one published event (a scored
    window's score event, else a ``frames`` event), in order, none missing, none twice."""
    steps, streams = play(ops)
    events = run_stage(stage_items(steps, verdict))
    check_released(published_frames(events), streams)


def test_frames_released_by_an_unscored_window_or_the_end_go_out_in_a_frames_event():
    """Scored windows 0-2.5 s, then silence: the window at 2.5 s releases the last scored window's
    frames, which no rule and no score event carry: a ``frames`` event does, on the model's score
    topic, no alert; and so does the stream's end for a stretch still pending."""
    steps = [("x", 0.5 * k, tagged(0.5 * k, 0.5 * k + 2.0, k + 1)) for k in range(2)]
    steps += [("x", 0.5 * k, None) for k in range(2, 6)]
    steps += [("x", 0.5 * k, tagged(0.5 * k, 0.5 * k + 2.0, k + 1)) for k in range(6, 8)] + [("x", None, None)]
    events = run_stage(stage_items(steps))
    carriers = [e for e in events if e.kind == "frames"]
    assert len(carriers) == 2, [e.kind for e in events]
    for e, (first, last) in zip(carriers, [(0.5 + OFFSET, 2.5), (3.5 + OFFSET, 5.5)]):
        assert e.topic == "scores.x.emo" and e.model == "emo-id" and e.model_name == "emo"
        assert e.rule is None and e.phase is None and e.scores is None and e.label is None
        times = e.extra["frames"]["times"]
        assert times[0] > first - 1e-9 and times[-1] < last and e.stream_start == times[0] and e.stream_end == times[-1]
        back = Event.from_json(e.to_json())  # what a subscriber reads
        assert back.kind == "frames" and back.topic == "scores.x.emo" and back.extra["frames"] == e.extra["frames"]
    check_released(published_frames(events), {"x": [scored_spans(steps[:2]), scored_spans(steps[6:8]), []], "y": [[]]})


def test_frames_wait_for_room_rather_than_being_dropped_when_the_output_is_full():
    """A full output channel drops live score streams, but not frames: each frame in exactly one event."""
    steps = [("x", 0.5 * k, tagged(0.5 * k, 0.5 * k + 2.0, k + 1)) for k in range(40)] + [("x", None, None)]
    events = run_stage(stage_items(steps), out_size=1)
    check_released(published_frames(events), {"x": [scored_spans(steps), []], "y": [[]]})


def test_an_alert_that_lies_inside_frames_an_unscored_window_released_has_its_frames_published():
    """Only the last scored window's frames reach the threshold (column c grows with the window), and
    the unscored window that releases them starts the hold, completes it and ends it at once: the
    onset and offset go out, and so must the frames they lie in."""
    steps = [("x", 0.5 * k, tagged(0.5 * k, 0.5 * k + 2.0, k + 1)) for k in range(3)]  # 0-3 s, the last one 1-3 s
    steps += [("x", 0.5 * k, None) for k in range(3, 7)]  # the window at 3.0 s releases the last one's frames
    rule = RuleConfig(id="held", model="emo", label="c", threshold=0.0025, hold_s=0.2)
    events = run_stage(stage_items(steps), rules=[rule])
    times = [t for t, _, _ in published_frames(events)["x"]]
    alerts = [e for e in events if e.kind == "alert"]
    assert [e.phase for e in alerts] == ["onset", "offset"]
    onset = alerts[0]
    for t in (onset.stream_start, onset.stream_end):  # where the held run began, and the frame that completed it
        assert any(abs(t - f) < 1e-6 for f in times), (t, times[-3:])
    assert alerts[1].stream_end == pytest.approx(times[-1] + HOP)  # it ended where the published frames end


# --- the real daemon against `monitord classify --timeline` -------------------------------------


ANGRY = AUDIO / "speech_angry" / "03-01-05-02-01-01-10.wav"
SAD = AUDIO / "speech_sad" / "03-01-04-02-01-01-10.wav"
SILENCE_S = 4.0
TOLERANCE = 2e-5
"""Events round values to 5 digits, result.json to 6; batching may move the 7th."""


def speech_pause_speech(rate: int) -> np.ndarray:
    from monitord.audio import resample

    parts = []
    for path in (shared_path(ANGRY), shared_path(SAD)):
        samples, native = sf.read(str(path), dtype="float32")
        parts.append(samples if native == rate else resample(samples, native, rate))
    return np.concatenate([parts[0], silence(SILENCE_S, rate), parts[1]])


def live_frames(config: Path, port: int) -> tuple[list[dict], str]:
    """`monitord run --until-done` on the config's (real-time) file, every event received on its
    PUB socket by a subscriber connected before it started."""
    sub = Subscriber(f"tcp://127.0.0.1:{port}")
    try:
        proc = subprocess.run(monitord_cmd("run", "-c", str(config), "--until-done"), cwd=REPO, capture_output=True,
                              text=True, timeout=180)
        assert proc.returncode == 0, proc.stderr[-3000:]
        count, deadline = -1, time.monotonic() + 10
        while count != len(sub.messages) and time.monotonic() < deadline:  # until nothing more arrives
            count = len(sub.messages)
            time.sleep(0.5)
        return sub.events, proc.stderr
    finally:
        sub.close()


@pytest.mark.parametrize("rate", [44100, 48000])
def test_a_streams_published_frames_are_the_timeline_frames_of_the_same_file(tiny_emotion, tmp_path, rate):
    """Speech, 4 s of silence the speech gate rejects, speech: the daemon on the file (in real time,
    events over ZeroMQ on loopback) publishes exactly the frames `classify --timeline` writes for it,
    the same count, times and values, including the frames released by the silence and at the end."""
    write_wav(tmp_path / "talk.wav", speech_pause_speech(rate), rate)
    port = free_port()
    config = tmp_path / "c.yaml"
    config.write_text(f"""
sources: [{{id: talk, file: talk.wav, realtime: true}}]
models:
  emo: {{kind: emotion, model: {tiny_emotion}, granularity: frame, dtype: float32, gate: {{mode: speech, vad: silero}}}}
publish: {{endpoint: "tcp://127.0.0.1:{port}", event_log: events.jsonl, scores: true}}
""")
    out = subprocess.run(monitord_cmd("classify", str(tmp_path / "talk.wav"), "-c", str(config), "--timeline",
                                      str(tmp_path / "tl"), "--quiet"), cwd=REPO, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "tl" / "talk" / "result.json").read_text())
    offline = result["frames"]["emo"]
    windows = result["windows"]
    scored = [w["verdicts"]["emo"] == "scored" for w in windows]
    # the file has what the test is about: a gated-out stretch that releases the frames before it
    # (an unscored window starting at or after the last scored window's end) and speech at the end
    last_end = None
    released_by_silence = False
    for w, ok in zip(windows, scored):
        if ok:
            last_end = w["stream_end"]
        elif last_end is not None and w["stream_start"] >= last_end:
            released_by_silence = True
    assert released_by_silence and scored[-1] and not all(scored), scored
    values = np.array(offline["values"])
    moves = np.abs(np.diff(values, axis=0)).max(axis=1)
    assert np.median(moves) > 50 * TOLERANCE  # the model's frames differ: equal values mean the same frames

    events, err = live_frames(config, port)
    carriers = [e for e in events if "frames" in e]
    assert all(e["kind"] in ("scores", "frames") and e["model_name"] == "emo" for e in carriers)
    times = [t for e in carriers for t in e["frames"]["times"]]
    live = np.array([row for e in carriers for row in e["frames"]["values"]])
    print(f"{rate} Hz: {len(times)} frames published in {len(carriers)} events "
          f"({sum(e['kind'] == 'frames' for e in carriers)} frames events), {len(offline['times'])} in the timeline")
    assert all(e["frames"]["labels"] == offline["labels"] for e in carriers)
    assert len(times) == len(offline["times"]), (len(times), len(offline["times"]), err[-2000:])
    assert times == offline["times"]
    diff = np.abs(live - values).max()
    print(f"{rate} Hz: largest difference in value {diff:.2e}")
    assert diff <= TOLERANCE
    # the silence and the end released frames that no score event could carry
    assert any(e["kind"] == "frames" for e in carriers)


def test_tail_prints_a_frames_event_as_its_frame_count_and_stretch():
    from monitord.tools.tail import format_event
    from monitord.types import Event

    event = Event(kind="frames", source="mic", time="2026-12-03T05:00:00.000Z", host="h", seq=7, model_name="emotion",
                  stream_start=1.0, stream_end=1.04, extra={"frames": {"hop_s": 0.02, "labels": ["a"], "times": [1.0, 1.02, 1.04],
                                                                       "values": [[1.0], [1.0], [1.0]]}})
    line = format_event(event.to_dict())
    assert line == "#7 2026-12-03T05:00:00.000Z frames mic emotion 3 frames stream=1.00-1.04s"
