"use strict";
// One push channel (server-sent events) feeds every widget; nothing polls.
const token = new URLSearchParams(location.search).get("token");
const withToken = (url) => token ? `${url}${url.includes("?") ? "&" : "?"}token=${encodeURIComponent(token)}` : url;
const TIMELINE_S = 300, MAX_BARS = 8, LINES = 6, MIN_OTHERS = 2;
const COLORS = ["#4fb3ff", "#3fb950", "#d29922", "#f85149", "#bc8cff", "#39c5cf", "#ff9bce", "#e3b341"];
// stretches: per timeline, each alert's onset -> offset ({rule, label, t0, t1}; t1 null while it lasts)
const state = { models: {}, rules: [], history: {}, canvases: {}, sources: {}, stretches: {} };
window.__timeline = {};  // per timeline, what it draws: series, threshold lines, shaded stretches (read by tests)

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}

function sourceCard(source) {
  let card = document.querySelector(`.source[data-source="${CSS.escape(source)}"]`);
  if (card) return card;
  card = el("div", { class: "source", "data-source": source },
    el("h3", {}, el("span", { text: source }), el("span", { class: "badge gate starting", "data-state": "starting", text: "starting" })),
    el("div", { class: "source-state", "data-state": "starting", text: "starting" }),
    el("div", { class: "level", text: "level: -- dBFS" }),
    el("div", { class: "meter" }, el("div")),
    el("ul", { class: "model-states" }),
    el("ul", { class: "rule-states" }),
    el("div", { class: "models" }, el("p", { class: "empty", text: "no scores yet: no window of this source has been scored" })));
  document.getElementById("sources").append(card);
  state.sources[source] ||= { state: "starting", passed: null };
  renderModelStates(card);
  return card;
}

// The badge says what the source is doing: its state while it is not up (a source that is down
// writes silence, so its gate would only ever say "quiet"), the gate's verdict once it is.
function renderBadge(source) {
  const s = state.sources[source];
  const badge = sourceCard(source).querySelector(".gate");
  const value = s.state !== "up" ? s.state : s.passed === null ? "up" : s.passed ? "sound" : "quiet";
  badge.textContent = value;
  badge.dataset.state = value;
  badge.className = `badge gate ${value}`;
  badge.title = s.state === "up" ? "the gate's verdict on the last window" : (s.detail || s.state);
}

// which models are active (scoring here), remote (scoring on a remote backend), loading (in the
// background, after the start) or inactive, and the rules on them
function renderModelStates(card) {
  const source = card.dataset.source;
  card.querySelector(".model-states").replaceChildren(...Object.entries(state.models).map(([name, m]) =>
    el("li", { class: `model-state ${m.state}`, "data-model": name, "data-state": m.state, title: m.detail || "" },
      el("strong", { text: name }), ` ${m.kind}: ${m.state}`,
      m.state === "inactive" ? el("small", { text: ` (${m.detail})` }) : "")));
  card.querySelector(".rule-states").replaceChildren(...state.rules
    .filter((r) => !r.sources || r.sources.includes(source))
    .map((r) => {
      const ruleState = r.state || (r.active ? "active" : "inactive");
      return el("li", { class: `rule-state ${ruleState}`, "data-rule": r.id, "data-active": String(r.active),
                        "data-state": ruleState, title: r.detail || "" },
        `rule ${r.id} (${r.model}: ${r.label} \u2265 ${r.threshold})`,
        r.active ? "" : el("small", { text: ` ${ruleState}: ${r.detail}` }));
    }));
}

// a model loaded in the background (or found unable to load): the models and rules as they are now
async function refreshModelStates() {
  const response = await fetch(withToken("api/state"));
  if (!response.ok) return;
  const now = await response.json();
  state.models = now.models;
  state.rules = now.rules;
  document.querySelectorAll(".source[data-source]").forEach(renderModelStates);
  setUpTryIt(now.try_it || {});
}

function setSourceState(source, value, detail) {
  const line = sourceCard(source).querySelector(".source-state");
  line.dataset.state = value;
  line.className = `source-state ${value}`;
  line.textContent = detail ? `${value}: ${detail}` : value;
  Object.assign(state.sources[source], { state: value, detail });
  renderBadge(source);
}

function renderBars(container, scores, max = MAX_BARS) {
  const entries = Object.entries(scores).sort((a, b) => b[1] - a[1]).slice(0, max);
  container.replaceChildren(...entries.map(([label, p]) => {
    const fill = el("div", { class: "fill" });
    fill.style.width = `${(100 * p).toFixed(1)}%`;
    return el("div", { class: "bar", "data-label": label, "data-score": p.toFixed(6) },
      el("span", { class: "name", text: label }), el("div", { class: "track" }, fill), el("span", { class: "value", text: p.toFixed(3) }));
  }));
}

function onWindow(w) {
  const card = sourceCard(w.source);
  card.querySelector(".level").textContent = `level: ${w.rms_dbfs.toFixed(1)} dBFS (peak frame ${w.peak_dbfs.toFixed(1)})`;
  card.querySelector(".meter > div").style.width = `${Math.max(0, Math.min(100, (w.rms_dbfs + 90) / 90 * 100))}%`;
  const s = state.sources[w.source];
  s.passed = w.passed;
  if (s.state === "starting") setSourceState(w.source, "up", "");  // audio arrives: it is up
  else renderBadge(w.source);
  if (!Object.keys(state.canvases).length) {
    document.getElementById("timelines-empty").textContent = w.passed
      ? "no windows scored yet: the first scored window starts the timeline"
      : "no windows scored yet: every window so far was quiet (below the gate), so no model scored one";
  }
}

function onScores(s) {
  const card = sourceCard(s.source);
  let box = card.querySelector(`.model[data-model="${CSS.escape(s.model_name)}"]`);
  if (!box) {
    box = el("div", { class: "model", "data-model": s.model_name }, el("h4", { text: s.model_name }), el("div", { class: "bars" }));
    card.querySelector(".models .empty")?.remove();
    card.querySelector(".models").append(box);
  }
  box.querySelector("h4").textContent = `${s.model_name} @ ${s.stream_start.toFixed(1)}-${s.stream_end.toFixed(1)} s`;
  renderBars(box.querySelector(".bars"), s.scores);
  const key = `${s.source} / ${s.model_name}`;
  const history = (state.history[key] ||= []);
  history.push({ t: s.stream_end, scores: s.scores });
  while (history.length && history[0].t < s.stream_end - TIMELINE_S) history.shift();
  drawTimeline(s.source, s.model_name);
}

function onAlert(e) {
  const key = `${e.source} / ${e.model_name}`;
  const stretches = (state.stretches[key] ||= []);
  if (e.phase === "onset") stretches.push({ rule: e.rule, label: e.label, t0: e.stream_end, t1: null });
  else {
    const open = stretches.findLast((s) => s.rule === e.rule && s.t1 === null);
    if (open) open.t1 = e.stream_end;
  }
  if (state.history[key]) drawTimeline(e.source, e.model_name);
}

// The rules that watch this model on this source: their labels stay on its timeline whatever scores highest.
function watchingRules(source, model) {
  return state.rules.filter((r) => r.active && r.model === model && (!r.sources || r.sources.includes(source)));
}

// The time axis spans the data the page has (at most the last TIMELINE_S seconds of stream time),
// so the first minutes fill the width instead of being squeezed into its right edge. The labels rules
// watch are always drawn, each with a dashed line at its rule's threshold, and each alert's stretch
// is shaded; the labels that scored highest follow (LINES in all, at least MIN_OTHERS of them).
function drawTimeline(source, model) {
  const key = `${source} / ${model}`;
  let entry = state.canvases[key];
  if (!entry) {
    const canvas = el("canvas", { "data-timeline": key, width: 1200, height: 200,
                                  "data-x-label": "stream time (s)", "data-y-label": "score" });
    const legend = el("div", { class: "legend" });
    document.getElementById("timelines").append(el("h4", { text: key }), canvas, legend);
    document.getElementById("timelines-empty").hidden = true;
    entry = state.canvases[key] = { canvas, legend };
  }
  const history = state.history[key];
  const canvas = entry.canvas;
  const ctx = canvas.getContext("2d");
  const { width, height } = canvas;
  ctx.clearRect(0, 0, width, height);
  if (!history.length) return;
  const rules = watchingRules(source, model);
  const watched = [...new Set(rules.map((r) => r.label))];
  const best = {};
  for (const h of history) for (const [label, p] of Object.entries(h.scores)) best[label] = Math.max(best[label] || 0, p);
  const others = Object.keys(best).filter((label) => !watched.includes(label)).sort((a, b) => best[b] - best[a])
    .slice(0, Math.max(MIN_OTHERS, LINES - watched.length));
  const labels = [...watched, ...others];
  const color = (label) => COLORS[labels.indexOf(label) % COLORS.length];
  const t1 = history[history.length - 1].t, t0 = history[0].t;
  const span = Math.max(t1 - t0, 1);
  const left = 52, right = 28, top = 10, bottom = 38;
  const x = (t) => left + (width - left - right) * (t - t0) / span;
  const y = (p) => height - bottom - (height - top - bottom) * p;
  canvas.dataset.t0 = t0.toFixed(3);
  canvas.dataset.t1 = t1.toFixed(3);
  canvas.dataset.x0 = x(history[0].t).toFixed(1);
  ctx.font = "12px system-ui, sans-serif";
  ctx.fillStyle = "#8b98a5";
  ctx.strokeStyle = "#2d3742"; ctx.lineWidth = 1;
  ctx.textAlign = "right"; ctx.textBaseline = "middle";
  for (const p of [0, 0.25, 0.5, 0.75, 1]) {
    ctx.beginPath(); ctx.moveTo(left, y(p)); ctx.lineTo(width - right, y(p)); ctx.stroke();
    ctx.fillText(p.toFixed(2), left - 6, y(p));
  }
  const step = niceStep(span / 8);
  ctx.textAlign = "center"; ctx.textBaseline = "top";
  const ticks = [];
  for (let t = Math.ceil(t0 / step) * step; t <= t1 + 1e-9; t += step) {
    ticks.push(t);
    ctx.beginPath(); ctx.moveTo(x(t), height - bottom); ctx.lineTo(x(t), height - bottom + 4); ctx.stroke();
    ctx.fillText(formatTime(t), x(t), height - bottom + 6);
  }
  canvas.dataset.ticks = ticks.map(formatTime).join(",");
  ctx.fillText(canvas.dataset.xLabel, left + (width - left - right) / 2, height - 14);
  ctx.save(); ctx.translate(12, top + (height - top - bottom) / 2); ctx.rotate(-Math.PI / 2);
  ctx.textBaseline = "middle"; ctx.fillText(canvas.dataset.yLabel, 0, 0); ctx.restore();
  const stretches = (state.stretches[key] || []).filter((s) => (s.t1 ?? t1) >= t0);
  state.stretches[key] = stretches;
  const shaded = stretches.map((s) => ({ rule: s.rule, label: s.label, t0: Math.max(s.t0, t0), t1: Math.min(s.t1 ?? t1, t1),
                                         open: s.t1 === null }));
  ctx.fillStyle = "rgba(248, 81, 73, 0.18)";
  ctx.textAlign = "left"; ctx.textBaseline = "top";
  for (const s of shaded) {
    const x0 = x(s.t0), w = Math.max(x(s.t1) - x0, 2);
    ctx.fillRect(x0, top, w, height - top - bottom);
    ctx.save(); ctx.fillStyle = "#f85149"; ctx.fillText(s.rule, x0 + 3, top + 2); ctx.restore();
  }
  const thresholds = rules.map((r) => ({ rule: r.id, label: r.label, threshold: r.threshold }));
  ctx.lineWidth = 1.5; ctx.setLineDash([6, 4]); ctx.textAlign = "right"; ctx.textBaseline = "bottom";
  for (const th of thresholds) {
    ctx.strokeStyle = ctx.fillStyle = color(th.label);
    ctx.beginPath(); ctx.moveTo(left, y(th.threshold)); ctx.lineTo(width - right, y(th.threshold)); ctx.stroke();
    ctx.fillText(`${th.rule} \u2265 ${th.threshold}`, width - right - 4, y(th.threshold) - 2);
  }
  ctx.setLineDash([]);
  const series = labels.map((label) => {
    ctx.strokeStyle = color(label); ctx.lineWidth = watched.includes(label) ? 3 : 2; ctx.beginPath();
    const points = history.map((h) => [h.t, h.scores[label] ?? 0]);
    points.forEach(([t, p], j) => (j ? ctx.lineTo(x(t), y(p)) : ctx.moveTo(x(t), y(p))));
    ctx.stroke();
    return { label, watched: watched.includes(label), color: color(label), best: best[label] ?? 0, points };
  });
  window.__timeline[key] = { t0, t1, series, thresholds, shaded, latest: history[history.length - 1].scores };
  canvas.dataset.series = labels.join("|");
  canvas.dataset.shaded = shaded.map((s) => `${s.rule}:${s.t0.toFixed(1)}-${s.t1.toFixed(1)}`).join(",");
  entry.legend.replaceChildren(...labels.map((label) => {
    const rule = thresholds.filter((th) => th.label === label).map((th) => `${th.rule} \u2265 ${th.threshold}`).join(", ");
    const s = el("span", { text: `\u25A0 ${label}${rule ? ` (rule ${rule})` : ""}` }); s.style.color = color(label); return s;
  }), ...(shaded.length ? [el("span", { class: "alert-swatch", text: "\u25A0 alert (onset to offset)" })] : []));
}

function niceStep(raw) {
  const steps = [0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1800, 3600];
  return steps.find((s) => s >= raw) || 3600 * Math.ceil(raw / 3600);
}

function formatTime(t) {
  if (t < 120) return `${+t.toFixed(1)} s`;
  const m = Math.floor(t / 60), s = Math.round(t - 60 * m);
  return `${m}:${String(s).padStart(2, "0")}`;
}

function onEvent(e, live = false) {
  const list = document.getElementById("events");
  let item;
  if (e.kind === "alert") {
    onAlert(e);
    item = el("li", { class: e.phase, "data-rule": e.rule },
      el("strong", { text: `${e.phase.toUpperCase()} ${e.rule}` }),
      ` ${e.source}: "${e.label}" ${e.score.toFixed(3)} at ${e.stream_start.toFixed(1)}-${e.stream_end.toFixed(1)} s`,
      el("br"), el("small", { text: `#${e.seq} ${e.time} latency ${e.latency_ms ?? "-"} ms` }));
    if (e.phase === "onset") item.append(feedbackButtons(e));
  } else {
    item = el("li", { class: "status", "data-status": e.status, "data-source": e.source },
      `#${e.seq} ${e.source}: ${e.status}: ${e.detail ?? ""}`);
    if (["up", "down", "eof"].includes(e.status) && document.querySelector(`.source[data-source="${CSS.escape(e.source)}"]`))
      setSourceState(e.source, e.status === "eof" ? "ended" : e.status, e.status === "up" ? "" : e.detail);
    if (e.status === "suppressed" && e.rule) item.append(feedbackButtons(e));  // "yes, this" undoes a wrong suppression
    if (live && ["model_loaded", "model_unavailable"].includes(e.status)) refreshModelStates();
    if (e.status === "clip" && e.clip) {
      const name = e.clip.split("/").pop();
      item.append(el("audio", { controls: "", preload: "none", src: withToken(`clips/${encodeURIComponent(name)}`) }));
    }
  }
  list.prepend(item);
  document.getElementById("events-empty").hidden = true;
  while (list.children.length > 200) list.lastChild.remove();
}

// "not this" / "yes, this" on an alert: the window is taught to the rule's not_like bank at once
function feedbackButtons(e) {
  const result = el("span", { class: "feedback-result", role: "status" });
  const send = async (verdict, button) => {
    box.querySelectorAll("button").forEach((b) => { b.disabled = true; });
    result.textContent = "teaching...";
    try {
      const response = await fetch(withToken("api/feedback"), {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ seq: e.seq, verdict }) });
      const answer = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
      result.className = `feedback-result ${response.ok ? "ok" : "error"}`;
      result.textContent = response.ok
        ? `taught: ${verdict === "not_this" ? "not " : ""}${answer.rule} (example #${answer.example}, from the ${answer.from}). ${answer.means || ""}`
        : answer.error;
    } catch (err) {
      result.className = "feedback-result error";
      result.textContent = `not sent: ${err}`;
    }
    box.querySelectorAll("button").forEach((b) => { b.disabled = false; });
  };
  const button = (text, verdict) => {
    const b = el("button", { type: "button", class: `feedback ${verdict}`, "data-verdict": verdict, text });
    b.addEventListener("click", () => send(verdict, b));
    return b;
  };
  const box = el("div", { class: "feedback-box" }, button("not this", "not_this"), " ", button("yes, this", "yes_this"), " ", result);
  return box;
}

async function start() {
  // Subscribe first, then read the state: an event published between the two is then in the state
  // or on the channel (or both: shown once), never in neither. Messages wait until the state is shown.
  const channel = new EventSource(withToken("api/events"));
  const early = [];
  let ready = false;
  const onLiveEvent = (e) => onEvent(e, true);
  const deliver = (handler) => (m) => {
    const data = JSON.parse(m.data);
    if (ready) handler(data); else early.push([handler, data]);
  };
  const badge = document.getElementById("connection");
  channel.onopen = () => { badge.textContent = "live"; badge.className = "badge on"; };
  channel.onerror = () => { badge.textContent = "reconnecting"; badge.className = "badge off"; };
  channel.addEventListener("window", deliver(onWindow));
  channel.addEventListener("scores", deliver(onScores));
  channel.addEventListener("event", deliver(onLiveEvent));
  await new Promise((resolve) => {  // subscribed (or failing to: the state is shown all the same)
    channel.addEventListener("open", resolve, { once: true });
    channel.addEventListener("error", resolve, { once: true });
  });
  const response = await fetch(withToken("api/state"));
  const initial = await response.json();
  state.models = initial.models;
  state.rules = initial.rules;
  initial.sources.forEach(sourceCard);
  for (const [source, s] of Object.entries(initial.source_states || {})) setSourceState(source, s.state, s.detail);
  initial.events.slice().reverse().forEach(onEvent);
  for (const m of initial.latest) (m.scores && m.model_name ? onScores : onWindow)(m);
  setUpTryIt(initial.try_it || {});
  const shown = new Set(initial.events.map((e) => e.seq));
  ready = true;
  for (const [handler, data] of early) if (handler !== onLiveEvent || !shown.has(data.seq)) handler(data);
}

function setUpTryIt(models) {
  const kinds = Object.values(models);
  const form = document.getElementById("try-form");
  if (!kinds.length) { form.hidden = true; document.getElementById("try-status").textContent = "no model that can score an upload is loaded"; return; }
  form.hidden = false;  // set up again when a model loaded in the background joins
  const labels = document.getElementById("try-labels");
  const names = Object.entries(models).map(([n, k]) => `${n} (${k})`).join(", ");
  document.getElementById("try-models").textContent = `scored by ${names}`;
  labels.closest("label").hidden = false;
  document.getElementById("try-labels-note").hidden = true;
  if (!kinds.includes("clap")) {
    labels.closest("label").hidden = true;
    const note = document.getElementById("try-labels-note");
    const clap = Object.entries(state.models).filter(([, m]) => m.kind === "clap");
    note.textContent = clap.length
      ? "No labels box: zero-shot labels need CLAP, and " + clap.map(([n, m]) => `${n} is ${m.state}` +
          (m.state === "inactive" ? ` (${m.detail})` : "")).join("; ")
      : "No labels box: zero-shot labels need a CLAP model, and none is configured.";
    note.hidden = false;
  } else if (kinds.includes("yamnet")) {
    labels.placeholder = "optional for CLAP: glass breaking, dog barking, speech, silence";
  }
}

function renderTryResult(result) {
  const box = document.getElementById("try-result");
  box.replaceChildren(...Object.entries(result.models).map(([name, r]) => {
    const section = el("div", { class: "try-model", "data-model": name, "data-kind": r.kind });
    const heard = `the loudest window, ${r.heard.stream_start.toFixed(1)}-${r.heard.stream_end.toFixed(1)} s ` +
      `(${r.heard.rms_dbfs.toFixed(1)} dBFS), of ${r.windows.length}`;
    section.dataset.heard = `${r.heard.stream_start}-${r.heard.stream_end}`;
    if (r.kind === "clap") {
      section.append(el("h4", { text: `${name}: zero-shot, ${heard}` }), el("div", { class: "bars" }));
      renderBars(section.querySelector(".bars"), r.probabilities, Infinity);
    } else {
      section.append(el("h4", { text: `${name}: top classes, ${heard}` }), el("div", { class: "bars classes" }));
      renderBars(section.querySelector(".classes"), r.top, Infinity);
      if (Object.keys(r.groups).length) {
        section.append(el("h4", { text: `${name}: groups` }), el("div", { class: "bars groups" }));
        renderBars(section.querySelector(".groups"), r.groups, Infinity);
      }
    }
    return section;
  }));
}

document.getElementById("try-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const status = document.getElementById("try-status");
  const file = document.getElementById("try-file").files[0];
  if (!file) { status.textContent = "choose an audio file"; return; }
  const body = new FormData();
  body.append("file", file);
  body.append("labels", document.getElementById("try-labels").value);
  status.textContent = "scoring...";
  const response = await fetch(withToken("api/try"), { method: "POST", body });
  const result = await response.json();
  if (!response.ok) { status.textContent = result.error; return; }
  status.textContent = `${result.windows} windows` + (result.note ? ` (${result.note})` : "");
  renderTryResult(result);
});

start();
