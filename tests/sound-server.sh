#!/bin/bash
# A real sound server for tests on a machine with no sound hardware (Debian 12, root).
# monitord's copy of the recipe proven on the project's CI machines.
# A PulseAudio null sink "vsink"; its monitor "vsink.monitor" is the default capture source,
# so whatever is played into vsink (paplay --device=vsink FILE) is captured through
# PortAudio's ALSA backend (the 'pulse' ALSA plugin), i.e. by sounddevice, for real.
#
#   sound-server.sh install        apt packages: libportaudio2 libasound2-plugins pulseaudio pulseaudio-utils sox espeak-ng
#   sound-server.sh start          start it; prints `export XDG_RUNTIME_DIR=...` for the caller to eval
#   sound-server.sh stop [SIG]     stop what start started, by PID (SIG: TERM or KILL)
#   sound-server.sh restart        stop, wait until really gone, start (for reconnect tests)
#
# With MONITORD_SOUND_OWNER=PID, start also leaves a watcher that stops the server once that process
# is gone: a test process killed before its own stop (a crashed pytest-xdist worker) leaves nothing.
#
# The server and every process that talks to it must share XDG_RUNTIME_DIR (its socket lives there).
# Notes seen on these machines:
# - PortAudio's Debian build has no PulseAudio backend: devices are ALSA 'pulse' and 'default'.
# - A process that initialised PortAudio while the server was down lists no devices until PortAudio
#   is re-initialised (sounddevice: sd._terminate(); sd._initialize()).
# - Killing the server mid-stream: callbacks stop, finished_callback fires, stream.active becomes
#   False while stream.stopped stays False; no status flag, no exception. Blocking read() raises
#   PortAudioError. Reopening after a restart works in the same process.
# - PulseAudio buffers on its side: input overflow cannot be provoked by a slow callback here.
set -euo pipefail
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-${TMPDIR:-$(dirname "$(mktemp -u)")}/monitord-sound}

alive() { local s; s=$(ps -o stat= -p "$1" 2>/dev/null) && [[ $s != Z* ]]; }

start() {
  mkdir -p -m 700 "$XDG_RUNTIME_DIR"
  if ! pactl info >/dev/null 2>&1; then
    pulseaudio --daemonize=yes --exit-idle-time=-1 -n \
      --log-target=file:"$XDG_RUNTIME_DIR/pulse.log" \
      --load=module-native-protocol-unix \
      --load="module-null-sink sink_name=vsink rate=48000" >/dev/null 2>&1
    for _ in $(seq 50); do pactl info >/dev/null 2>&1 && break; sleep 0.1; done
  fi
  pactl set-default-sink vsink
  pactl set-default-source vsink.monitor
  # An idle null sink renders in ~2 s cycles, so a new capture stream would start late and miss
  # audio: keep one low-latency reader attached.
  if ! { [ -s "$XDG_RUNTIME_DIR/keepalive.pid" ] && alive "$(cat "$XDG_RUNTIME_DIR/keepalive.pid")"; }; then
    nohup parec -d vsink.monitor --latency-msec=10 --raw >/dev/null 2>&1 &
    echo $! >"$XDG_RUNTIME_DIR/keepalive.pid"
  fi
  if [ -n "${MONITORD_SOUND_OWNER:-}" ] && ! { [ -s "$XDG_RUNTIME_DIR/watch.pid" ] && alive "$(cat "$XDG_RUNTIME_DIR/watch.pid")"; }; then
    setsid nohup bash "$0" watch "$MONITORD_SOUND_OWNER" </dev/null >/dev/null 2>&1 &
    echo $! >"$XDG_RUNTIME_DIR/watch.pid"
  fi
  # Ready once the monitor delivers data.
  n=$( (timeout 5 parec -d vsink.monitor --latency-msec=10 --raw 2>/dev/null || true) | head -c 9600 | wc -c)
  [ "$n" -ge 9600 ] || { echo "sound-server: no data from vsink.monitor" >&2; exit 1; }
  echo "export XDG_RUNTIME_DIR=$XDG_RUNTIME_DIR"
}

stop() {
  local sig=${1:-TERM} f pid
  for f in "$XDG_RUNTIME_DIR/watch.pid" "$XDG_RUNTIME_DIR/pulse/pid" "$XDG_RUNTIME_DIR/keepalive.pid"; do
    [ -s "$f" ] || continue
    pid=$(cat "$f"); kill -s "$sig" "$pid" 2>/dev/null || true
    for _ in $(seq 50); do alive "$pid" || break; sleep 0.1; done
    if alive "$pid"; then kill -s KILL "$pid" 2>/dev/null || true; fi  # 5 s were not enough
    rm -f "$f"
  done
}

case "${1:-}" in
  install)
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends \
      libportaudio2 libasound2-plugins pulseaudio pulseaudio-utils sox espeak-ng >/dev/null ;;
  start) start ;;
  stop) stop "${2:-TERM}" ;;
  restart) stop "${2:-TERM}"; start ;;
  watch)  # (start's) until process $2 is gone, then stop
    while alive "$2"; do sleep 1; done
    rm -f "$XDG_RUNTIME_DIR/watch.pid"
    stop TERM ;;
  *) echo "usage: $0 install|start|stop [TERM|KILL]|restart" >&2; exit 2 ;;
esac
