"""``monitord`` command line: run, serve, check-config, devices, classify, tail."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from functools import partial
from pathlib import Path

from monitord.config import Config, ConfigError, load_config

log = logging.getLogger("monitord")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
LOG_LEVELS = ("debug", "info", "warning", "error")


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "huggingface_hub", "urllib3", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _load(path: str) -> Config | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"{path}: invalid configuration", file=sys.stderr)
        for problem in exc.problems:
            print(str(problem), file=sys.stderr)
        return None


def _fail(message: str) -> int:
    print(f"monitord: {message}", file=sys.stderr)
    return EXIT_USAGE


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_USAGE
    from monitord.config import inactive_without
    from monitord.teaching.checks import check_banks

    problems, notes = check_banks(config)  # the banks and references, read as `run` reads them
    problems += _unreadable_files(config)
    if problems:
        for problem in problems:
            print(f"monitord: {problem}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{args.config}: ok ({len(config.sources)} sources, {len(config.models)} models, {len(config.rules)} rules)")
    for name in (n for n, m in config.models.items() if m.optional):
        models, rules = inactive_without(config, {name})
        parts = [f"rules {', '.join(sorted(rules))}" if rules else "",
                 f"models {', '.join(sorted(m for m in models if m != name))}" if len(models) > 1 else ""]
        depends = "; ".join(p for p in parts if p) or "nothing depends on it"
        print(f"models.{name}: optional: where it cannot be loaded, monitord starts without it; inactive then: {depends}")
    for note in notes:
        print(note)
    return EXIT_OK


def _unreadable_files(config) -> list[str]:
    """The file sources `run` would refuse, opened as it opens them (the config check sees only that
    the file is there)."""
    from monitord.audio import AudioFileError, audio_file_info

    problems = []
    for i, source in enumerate(config.sources):
        if source.file is not None:
            try:
                audio_file_info(source.file)
            except AudioFileError as exc:
                problems.append(f"sources.{i}.file: {exc}")
    return problems


def cmd_run(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_USAGE
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        if stop.is_set():  # `make run`: make passes its SIGTERM on to the daemon, which got it already
            log.debug("received %s again: already stopping", signal.Signals(signum).name)
            return
        stop.set()  # before logging: a second signal may run this handler again inside the log call
        log.info("received %s, stopping", signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the daemon can reload

    from monitord.sources import SourceError
    from monitord.daemon import Daemon
    from monitord.inference.build import check_later, load_later, load_models
    from monitord.inference.models import ModelUnavailable
    from monitord.output.publish import PublishError

    # the required models load now (one that cannot, ends the start); the optional ones after the
    # start, in the background, unless their files are surely not there (known without torch)
    later = load_later(config)
    try:
        models = load_models(config, only=set(config.models) - set(later))
    except ModelUnavailable as exc:
        return _fail(str(exc))
    later = check_later(config, later, models.unavailable)
    if stop.is_set():
        return EXIT_OK
    from monitord.teaching.references import ReferenceUnreadable

    try:
        daemon = Daemon(config, models, unavailable=models.unavailable, loading=later)
        daemon.start()
    except (SourceError, PublishError, ReferenceUnreadable) as exc:
        return _fail(str(exc))
    if daemon.dashboard is not None:
        url = daemon.dashboard.url  # the dashboard logs it too
        print(f"monitord: dashboard at {url}" + (" (add ?token=YOUR_TOKEN)" if config.http.token else ""), flush=True)
    daemon.load_later(later)
    from monitord.sdnotify import Watchdog, notify

    log.info("monitord running: %d sources, %d models, %d rules%s", len(config.sources), len(models), len(config.rules),
             f"; loading {', '.join(later)} in the background" if later else "")
    notify(f"READY=1\nSTATUS=listening to {len(config.sources)} sources with {len(models)} models")

    hangup = threading.Event()
    signal.signal(signal.SIGHUP, lambda _signum, _frame: hangup.set())  # the supervising loop reloads
    try:
        daemon.wait(stop, until_done=args.until_done, watchdog=Watchdog(), hangup=hangup,
                    on_hangup=lambda: _reload(daemon, args.config, notify))
    finally:
        notify("STOPPING=1")
        finished = args.until_done and not stop.is_set() and not daemon.exit_code
        daemon.stop(drain_timeout_s=float("inf") if finished else None)
        for signum in (signal.SIGTERM, signal.SIGINT):  # stopped: a late signal would only kill the exit (status -15)
            signal.signal(signum, signal.SIG_IGN)
    if daemon.fatal:
        print(f"monitord: {daemon.fatal}", file=sys.stderr)
    return EXIT_FAILURE if daemon.exit_code else EXIT_OK


def _reload(daemon, path: str, notify) -> None:
    log.info("SIGHUP: reloading %s", path)
    notify("RELOADING=1")
    try:
        try:
            new = load_config(path)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("%s: %s", path, problem)
            log.error("reload refused: the new configuration is invalid (see above); the running one stays")
            daemon.status("daemon", "reload_failed", "invalid configuration: " + "; ".join(str(p) for p in exc.problems))
            return
        daemon.apply_reload(new)
    finally:
        notify("READY=1")


def cmd_devices(args: argparse.Namespace) -> int:
    try:
        import sounddevice as sd

        from monitord.sources.device import list_input_devices

        devices = list_input_devices()
    except (OSError, ImportError) as exc:  # PortAudio library missing
        return _fail(f"cannot use PortAudio: {exc}")
    except Exception as exc:
        return _fail(f"cannot list devices: {exc}")
    default = sd.default.device[0]
    if args.json:
        for d in devices:
            print(json.dumps({**d, "default": d["index"] == default}))
        return EXIT_OK
    if not devices:
        print("no input devices (is a sound server running, and can this user reach it?); "
              "`monitord run` with `retry: true` on a device source waits for one")
        return EXIT_OK
    print(f"{'index':>5}  {'ch':>3}  {'rate':>7}  name")
    for d in devices:
        mark = " *" if d["index"] == default else ""
        print(f"{d['index']:>5}  {d['channels']:>3}  {d['sample_rate']:>7.0f}  {d['name']}{mark}")
    return EXIT_OK


def cmd_classify(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_USAGE
    from monitord.tools.classify import AudioFileError, audio_files, classify_file, count_windows
    from monitord.inference.build import load_models
    from monitord.inference.models import ModelUnavailable
    from monitord.tools.evaluate import RuleOutcomes

    files = audio_files([Path(f) for f in args.files])
    if not files:
        return _fail(f"no audio files in {' '.join(args.files)}")
    unreadable = []
    for path in files:
        try:
            count_windows(path, config)
        except AudioFileError as exc:
            unreadable.append(exc)
    if len(unreadable) == len(files):  # nothing to classify: said before a model is loaded (seconds of imports)
        for exc in unreadable:
            print(f"monitord: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        models = load_models(config)
    except ModelUnavailable as exc:
        return _fail(str(exc))
    for name, reason in models.unavailable.items():
        print(f"monitord: optional model {name} is not loaded, going on without it: {reason.missing or reason}"
              + (f". Fix: {reason.fix}" if reason.fix else ""), file=sys.stderr)
    references = {}
    if args.rules:
        from monitord.teaching.references import ReferenceUnreadable, for_rules, kept_folder

        try:
            references = for_rules(config, models.get, kept_folder())  # what guards each rule's recall, as in the daemon
        except ReferenceUnreadable as exc:
            return _fail(str(exc))
    summary_json = args.json and args.timeline  # --json with --timeline: the summary, not the windows
    emotion_models = [n for n in models if config.models[n].kind == "emotion"] if args.timeline else []
    curves, rows = [], []
    failed = 0
    for path in files:
        try:
            total, seconds = count_windows(path, config)
            progress = Progress(path.name, total) if seconds > 60 and not args.quiet else None
            results = []
            rules = RuleOutcomes(config.rules, references) if args.rules else None  # each file from a quiet start, as a new stream
            for row in classify_file(path, config, models):
                if args.timeline:
                    results.append(row)
                outcomes = rules.step(row) if rules is not None else None
                if not args.quiet and not summary_json:
                    data = {"file": str(path), **row.to_dict()} if len(files) > 1 else row.to_dict()
                    if outcomes is not None:
                        data["rules"] = outcomes
                    print(json.dumps(data) if args.json else (f"{path.name}  " if len(files) > 1 else "") + row.to_text(args.top)
                          + (RuleOutcomes.text(outcomes) if outcomes is not None else ""))
                if progress:
                    progress.step()
            if rules is not None and not args.quiet and not summary_json and (ended := rules.end())["raised"]:
                print(json.dumps({"file": str(path), "end_of_file": True, "rules": ended}) if args.json
                      else f"{path.name}: end of file{RuleOutcomes.text(ended)}")
            if progress:
                progress.done()
            if args.timeline:
                from monitord.tools.summary import file_curve, summarise_curve
                from monitord.tools.timeline import write_timeline

                folder = write_timeline(path, results, list(models), Path(args.timeline), args.embeddings, args.segment_s)
                print(f"timeline: {folder}", file=sys.stderr)
                for name in emotion_models:
                    curves.append(file_curve(path, results, name, seconds, config.window.hop_s))
                    rows.append(summarise_curve(curves[-1], args.peak_threshold, args.peak_min_s))
        except AudioFileError as exc:
            print(f"monitord: {exc}", file=sys.stderr)
            failed += 1
        except BrokenPipeError:
            return EXIT_OK
    if rows:
        from monitord.tools.summary import write_summary

        csv_path, _ = write_summary(Path(args.timeline), curves, rows)
        print(f"summary: {csv_path}", file=sys.stderr)
    if summary_json:
        print(json.dumps({"summary": rows}, indent=1))
    return EXIT_USAGE if failed else EXIT_OK


class Progress:
    """A progress bar on stderr for long files."""

    def __init__(self, name: str, total: int):
        self.name, self.total, self.done_count = name, max(total, 1), 0

    def step(self) -> None:
        self.done_count += 1
        if self.done_count % 20 == 0 or self.done_count == self.total:
            filled = int(30 * self.done_count / self.total)
            print(f"\r{self.name}: [{'#' * filled}{'.' * (30 - filled)}] {self.done_count}/{self.total} windows",
                  end="", file=sys.stderr, flush=True)

    def done(self) -> None:
        print(file=sys.stderr)


def cmd_tail(args: argparse.Namespace) -> int:
    from monitord.tools.tail import tail

    endpoint, replay = args.connect, args.replay
    if args.config:
        config = _load(args.config)
        if config is None:
            return EXIT_USAGE
        endpoint = endpoint or _connectable(config.publish.endpoint)
        if config.publish.replay_endpoint:
            replay = replay or _connectable(config.publish.replay_endpoint)
    curve = None
    if args.curve_server_key or args.curve_client_key:
        if not (args.curve_server_key and args.curve_client_key):
            return _fail("--curve-server-key and --curve-client-key go together")
        try:
            curve = load_client_curve(args.curve_server_key, args.curve_client_key)
        except (OSError, ValueError) as exc:
            return _fail(f"cannot load CURVE keys: {exc}")
    return tail(endpoint or "tcp://127.0.0.1:5556", args.topic, as_json=args.json, count=args.count,
                timeout_s=args.timeout, since=args.since, replay_endpoint=replay, curve=curve)


def load_client_curve(server_public_file: str, client_secret_file: str) -> dict:
    import zmq.auth

    server_public, _ = zmq.auth.load_certificate(server_public_file)
    public, secret = zmq.auth.load_certificate(client_secret_file)
    if secret is None:
        raise ValueError(f"{client_secret_file} holds no secret key (use NAME.key_secret)")
    return {"server": server_public, "public": public, "secret": secret}


def cmd_teach(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_USAGE
    from monitord.inference.build import load_models
    from monitord.inference.models import ModelUnavailable
    from monitord.output.eventlog import EventLog
    from monitord.teaching import teach as lessons
    from monitord.teaching.bank import BankError, load, negative
    from monitord.teaching.port import TeachingPort
    from monitord.tools.classify import AudioFileError, audio_files

    def embedder(name: str):
        loaded = load_models(config, only={name})
        if name not in loaded:
            raise loaded.unavailable[name]
        return loaded[name]

    def find_event(seq: int) -> dict | None:
        if config.publish.event_log is None:
            raise lessons.TeachError("the config keeps no event log (publish.event_log)", "not found")
        return EventLog(config.publish.event_log, keep=config.publish.event_log_keep).find(seq)

    given = lessons.resolve_bank(Path(args.config).resolve().parent, args.bank) if args.bank else None
    try:
        if args.not_rule is not None:
            bank = lessons.not_like_bank(config, args.not_rule, given)
        elif given is None:
            return _fail("give --bank FILE (a rule's false alarms, --not RULE, go to its not_like bank)")
        else:
            bank = given
        if args.list:
            print(lessons.listing(load(bank)))
            return EXIT_OK
        if args.forget:
            print(json.dumps({"bank": str(bank), "forgotten": args.forget, "examples": len(lessons.forget(bank, args.forget))}))
            return EXIT_OK
        if (args.label is None) == (args.not_rule is None):
            return _fail("give --label NAME (your own sound) or --not RULE (a false alarm), or --list / --forget ID")
        if sum(x is not None and x != [] for x in (args.files, args.from_clip, args.from_event)) != 1:
            return _fail("give one of --files FILE..., --from-clip PATH, --from-event SEQ")
        if args.label is not None and not args.files:
            return _fail("--label takes --files")
        if args.label is not None and args.label.startswith("not:"):
            return _fail("teach a false alarm with --not RULE, not --label not:...")
        if args.from_event is not None:
            port = TeachingPort(config=lambda: config, find_event=find_event, embedder=embedder)
            summary = lessons.teach_event(port, args.from_event, "not", expect_rule=args.not_rule)
        else:
            model = embedder(lessons.embedding_model_for(config, bank, args.not_rule, args.model))
            if args.from_clip is not None:
                cuts = lessons.cut_file(config, Path(args.from_clip), model, prefix="clip", at_s=config.clips.pre_s)
            else:
                cuts = [c for f in audio_files([Path(f) for f in args.files]) for c in lessons.cut_file(config, f, model)]
            label = negative(args.not_rule) if args.not_rule is not None else args.label
            summary = lessons.teach_recordings(config, model, bank, label, cuts)
        print(json.dumps(summary))
    except (BankError, lessons.TeachError, ModelUnavailable, AudioFileError, ValueError) as exc:
        return _fail(str(exc))
    return EXIT_OK


def cmd_enroll(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_USAGE
    from monitord.sources import SourceError
    from monitord.tools.classify import AudioFileError, audio_files
    from monitord.inference.build import load_models
    from monitord.tools.evaluate import enrol, enrol_from_files, enrol_from_source
    from monitord.inference.models import ModelUnavailable

    clap_models = [n for n, m in config.models.items() if m.kind == "clap"]
    name = args.model or (clap_models[0] if clap_models else None)
    if name not in clap_models:
        return _fail(f"enrol needs a clap model of the config (--model NAME); clap models: {', '.join(clap_models) or 'none'}")
    if not args.files and not args.source:
        return _fail("give --source ID (record live) or --files FILE... (enrol from recordings)")
    try:
        loaded = load_models(config, only={name})
        if name not in loaded:  # optional, and not there: enrolling needs it
            raise loaded.unavailable[name]
        embedder = loaded[name]
        if args.files:
            windows = enrol_from_files(config, embedder, audio_files([Path(f) for f in args.files]))
        else:
            source = next((s for s in config.sources if s.id == args.source), None)
            if source is None:
                return _fail(f"no source {args.source!r} in {args.config} (sources: {', '.join(s.id for s in config.sources)})")
            windows = enrol_from_source(config, embedder, source, args.seconds)
        summary = enrol(config, embedder, windows, args.k, Path(args.out))
    except (ModelUnavailable, SourceError, AudioFileError, ValueError) as exc:
        return _fail(str(exc))
    print(json.dumps(summary))
    return EXIT_OK


def cmd_eval(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_USAGE
    from monitord.tools.classify import AudioFileError
    from monitord.inference.build import load_models
    from monitord.teaching.references import ReferenceUnreadable
    from monitord.tools.evaluate import evaluate, load_dataset, write_report
    from monitord.inference.models import ModelUnavailable

    name = args.model or next(iter(config.models))
    if name not in config.models:
        return _fail(f"no model {name!r} in {args.config}")
    try:
        examples = load_dataset(Path(args.data))
        if not examples:
            return _fail(f"no labelled audio files in {args.data}")
        models = load_models(config)
        if name in models.unavailable:  # optional, and not there: it is the one to evaluate
            raise models.unavailable[name]
        report = evaluate(config, models, name, examples)
    except (ModelUnavailable, AudioFileError, ValueError, OSError, ReferenceUnreadable) as exc:
        return _fail(str(exc))
    write_report(report, Path(args.out))
    summary = {k: v for k, v in report.items() if k not in ("file_scores", "confusion")}
    print(json.dumps(summary, indent=1))
    return EXIT_OK


def cmd_keys(args: argparse.Namespace) -> int:
    """Write a CURVE certificate pair: DIR/NAME.key (public, to share) and DIR/NAME.key_secret (0600)."""
    import os

    import zmq.auth

    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    for suffix in (".key", ".key_secret"):
        if (folder / f"{args.name}{suffix}").exists() and not args.force:
            return _fail(f"{folder / (args.name + suffix)} exists (use --force to replace it)")
    public, secret = zmq.auth.create_certificates(str(folder), args.name)
    os.chmod(secret, 0o600)
    print(f"public: {public}\nsecret: {secret} (keep it private)")
    return EXIT_OK


def _connectable(bind_endpoint: str) -> str:
    """Where to connect for a bound endpoint (a wildcard address means this host)."""
    return bind_endpoint.replace("://0.0.0.0:", "://127.0.0.1:").replace("://*:", "://127.0.0.1:")


def cmd_bench(args: argparse.Namespace) -> int:
    from monitord.tools.bench import main as bench_main
    from monitord.inference.models import ModelUnavailable

    try:
        return bench_main(args)
    except ModelUnavailable as exc:
        return _fail(str(exc))


def cmd_serve(args: argparse.Namespace) -> int:
    """Deploy the config's models as a Ray Serve application; print its URL; run until SIGTERM/SIGINT."""
    from monitord.config import load_serve_config
    from monitord.serve.service import is_loopback

    try:
        served = load_serve_config(args.config)
    except ConfigError as exc:
        print(f"{args.config}: invalid configuration", file=sys.stderr)
        for problem in exc.problems:
            print(str(problem), file=sys.stderr)
        return EXIT_USAGE
    if not is_loopback(args.host) and served.serve.token_file is None:
        return _fail(f"serve.token_file: required to serve on {args.host} (not loopback): capture nodes send the token "
                     "and the server refuses requests without it")
    try:
        from monitord.serve.deployment import install_stop_handlers, serve_forever
    except ImportError as exc:
        return _fail(f"monitord serve needs Ray Serve: pip install 'monitord[cluster]' ({exc})")
    stop = threading.Event()
    install_stop_handlers(stop)
    return serve_forever(args.config, args.address, args.host, args.port, args.replicas, args.gpus_per_replica, stop)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="monitord", description="Real-time audio monitoring daemon.")
    parser.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    # also after the subcommand (`monitord run -c X --log-level debug`); not given there, the one before stands
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default=argparse.SUPPRESS, choices=LOG_LEVELS, help="as before the subcommand")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=partial(argparse.ArgumentParser, parents=[common]))

    p = sub.add_parser("run", help="run the daemon until SIGTERM/SIGINT")
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--until-done", action="store_true", help="exit once every (file) source has ended and been scored")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("serve", help="score the config's models for capture nodes, as a Ray Serve application")
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--address", help="join this Ray cluster (default: start a local Ray instance)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP address (a non-loopback one needs serve.token_file)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replicas", type=int, help="replicas of the models (default: serve.replicas)")
    p.add_argument("--gpus-per-replica", type=float, help="GPUs per replica, fractions allowed (default: serve.gpus_per_replica)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("check-config", help="validate a config file (exit 2 with one line per problem)")
    p.add_argument("config")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("devices", help="list capture devices")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_devices)

    from monitord.tools.summary import PEAK_MIN_S, PEAK_THRESHOLD

    p = sub.add_parser("classify", help="score audio files offline with the configured gates, windows and models")
    p.add_argument("files", nargs="+", metavar="FILE", help="audio files or folders of them")
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--json", action="store_true",
                   help="one JSON object per window; with --timeline instead the summary of every file and emotion "
                        "model (summary.csv's rows, nested) as one JSON document at the end: the windows are in "
                        "DIR/<name>/result.json")
    p.add_argument("--top", type=int, default=3, help="labels shown per row")
    p.add_argument("--timeline", metavar="DIR",
                   help="write per-model CSV, result.json and a PNG plot per file into DIR/<name>/ (frame-level "
                        "emotion models also <model>.frames.csv and a heat map), and with emotion models "
                        "DIR/summary.csv and DIR/summary.png comparing the files")
    p.add_argument("--embeddings", action="store_true", help="with --timeline: also each model's embeddings (.npy)")
    p.add_argument("--segment-s", type=float, default=10.0, help="segment length for the timeline summary")
    p.add_argument("--rules", action="store_true",
                   help="also what the config's rules raise on each window (onsets, offsets: the daemon's alert "
                        "engine, each file from a quiet start) and, for rules with not_like, what they would raise "
                        "without their taught false alarms")
    p.add_argument("--quiet", action="store_true", help="no per-window rows (with --timeline)")
    p.add_argument("--peak-threshold", type=float, default=PEAK_THRESHOLD,
                   help=f"summary: an emotion peaks where its score stays at or above this (default {PEAK_THRESHOLD})")
    p.add_argument("--peak-min-s", type=float, default=PEAK_MIN_S,
                   help=f"summary: ...for at least this long (default {PEAK_MIN_S} s)")
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("tail", help="subscribe to a daemon and print its events")
    p.add_argument("--connect", help="endpoint (default: from -c CONFIG, else tcp://127.0.0.1:5556)")
    p.add_argument("-c", "--config")
    p.add_argument("--topic", default="", help="topic prefix, e.g. alert.kitchen (every event is still taken, to tell a "
                   "lost event from another topic's; only the matching ones are printed)")
    p.add_argument("--json", action="store_true", help="print each event's JSON")
    p.add_argument("--count", type=int, help="exit after this many events")
    p.add_argument("--timeout", type=float, help="exit (status 1) after this many seconds without an event")
    p.add_argument("--since", type=int, metavar="SEQ", help="first print the logged events after SEQ (0: all), then follow")
    p.add_argument("--replay", metavar="ENDPOINT", help="the daemon's replay endpoint (default: from -c CONFIG)")
    p.add_argument("--curve-server-key", metavar="FILE", help="the daemon's public certificate (server.key)")
    p.add_argument("--curve-client-key", metavar="FILE", help="this client's secret certificate (NAME.key_secret)")
    p.set_defaults(func=cmd_tail)
    p = sub.add_parser("enroll", help="record normal operation into an anomaly bank (from a source or files)")
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--source", help="a source of the config to record from")
    p.add_argument("--seconds", type=float, default=600.0, help="how much sound to record from --source")
    p.add_argument("--files", nargs="+", metavar="FILE", help="enrol from these files or folders instead")
    p.add_argument("--model", help="the clap model whose embeddings are enrolled (default: the first)")
    p.add_argument("--k", type=int, default=5, help="nearest neighbours")
    p.add_argument("--out", required=True, help="the bank to write (.npz)")
    p.set_defaults(func=cmd_enroll)

    p = sub.add_parser("teach", help="teach by example: your own sounds (--label) or a rule's false alarms (--not)")
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--bank", help="the bank (.npz) to add to, list or forget from; relative: to the config's folder, "
                   "as in the config. With --not RULE: the rule's not_like bank (the default)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--label", help="teach these files as the label NAME")
    what.add_argument("--not", dest="not_rule", metavar="RULE", help="teach a false alarm of RULE")
    what.add_argument("--list", action="store_true", help="list the bank's examples")
    what.add_argument("--forget", nargs="+", type=int, metavar="ID", help="remove examples by id")
    p.add_argument("--files", nargs="+", metavar="FILE", help="recordings (or folders): every window passing the gate")
    p.add_argument("--from-clip", metavar="PATH", help="an alert clip: its alerting window (clips.pre_s into it)")
    p.add_argument("--from-event", type=int, metavar="SEQ", help="a logged alert event: the alerting window of its clip")
    p.add_argument("--model", help="the model whose embeddings are taught (default: the bank's or the rule's)")
    p.set_defaults(func=cmd_teach)

    p = sub.add_parser("eval", help="precision/recall/F1, confusion, latency, false alarms, AUC/pAUC on labelled audio")
    p.add_argument("data", help="a folder with one subfolder per label, or a CSV file,label[,onset]")
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--model", help="the model to evaluate (default: the first)")
    p.add_argument("--out", default="eval", help="folder for eval.json and confusion.png")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("keys", help="create a CURVE certificate pair for the daemon or a subscriber")
    p.add_argument("dir")
    p.add_argument("--name", default="server")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("bench", help="measure the CLAP path against the transformers pipeline, side by side")
    from monitord.tools.bench import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        code = args.func(args)
        if argv is None:  # the process's own command line: it ends with this
            _exit_if_loading(code)
        return code
    except KeyboardInterrupt:
        return EXIT_OK
    except BrokenPipeError:  # `monitord teach --list | head`: the reader is gone, which is no error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return EXIT_OK


def _exit_if_loading(code: int) -> None:
    """`run` stopped while an optional model was still loading in the background: the daemon has
    closed everything, and the load is abandoned. The process exits at once (os._exit, after flushing
    what it wrote) instead of finalizing the interpreter, which a thread inside torch (its thread
    pool busy with the model) turns into an abort ("terminate called without an active exception")."""
    daemon = sys.modules.get("monitord.daemon")
    if daemon is None or not any(t.name == daemon.LOADER_THREAD and t.is_alive() for t in threading.enumerate()):
        return
    import os

    log.debug("exiting while a model still loads in the background: it is abandoned")
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
