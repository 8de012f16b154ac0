"use strict";
// One push channel (server-sent events) feeds every widget; nothing polls.
const token = new URLSearchParams(location.search).get("token");
const withToken = (url) => token ? `${url}${url.includes("?") ? "&" : "?"}token=${encodeURIComponent(token)}` : url;
const TIMELINE_S = 300, MAX_BARS = 8, LINES = 6;
const COLORS = ["#4fb3ff", "#3fb950", "#d29922", "#f85149", "#bc8cff", "#39c5cf", "#ff9bce", "#e3b341"];
const state = { models: {}, history: {}, canvases: {} };

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
    el("h3", {}, el("span", { text: source }), el("span", { class: "badge quiet gate", text: "quiet" })),
    el("div", { class: "level", text: "level: -- dBFS" }),
    el("div", { class: "meter" }, el("div")),
    el("div", { class: "models" }));
  document.getElementById("sources").append(card);
  return card;
}

function renderBars(container, scores) {
  const entries = Object.entries(scores).sort((a, b) => b[1] - a[1]).slice(0, MAX_BARS);
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
  const gate = card.querySelector(".gate");
  gate.textContent = w.passed ? "sound" : "quiet";
  gate.className = `badge gate ${w.passed ? "sound" : "quiet"}`;
}

function onScores(s) {
  const card = sourceCard(s.source);
  let box = card.querySelector(`.model[data-model="${CSS.escape(s.model_name)}"]`);
  if (!box) {
    box = el("div", { class: "model", "data-model": s.model_name }, el("h4", { text: s.model_name }), el("div", { class: "bars" }));
    card.querySelector(".models").append(box);
  }
  box.querySelector("h4").textContent = `${s.model_name} @ ${s.stream_start.toFixed(1)}-${s.stream_end.toFixed(1)} s`;
  renderBars(box.querySelector(".bars"), s.scores);
  const key = `${s.source} / ${s.model_name}`;
  const history = (state.history[key] ||= []);
  history.push({ t: s.stream_end, scores: s.scores });
  while (history.length && history[0].t < s.stream_end - TIMELINE_S) history.shift();
  drawTimeline(key);
}

function drawTimeline(key) {
  let entry = state.canvases[key];
  if (!entry) {
    const canvas = el("canvas", { "data-timeline": key, width: 1200, height: 180 });
    const legend = el("div", { class: "legend" });
    document.getElementById("timelines").append(el("h4", { text: key }), canvas, legend);
    entry = state.canvases[key] = { canvas, legend };
  }
  const history = state.history[key];
  const ctx = entry.canvas.getContext("2d");
  const { width, height } = entry.canvas;
  ctx.clearRect(0, 0, width, height);
  if (!history.length) return;
  const best = {};
  for (const h of history) for (const [label, p] of Object.entries(h.scores)) best[label] = Math.max(best[label] || 0, p);
  const labels = Object.keys(best).sort((a, b) => best[b] - best[a]).slice(0, LINES);
  const t1 = history[history.length - 1].t, t0 = Math.max(0, t1 - TIMELINE_S);
  const x = (t) => 30 + (width - 40) * (t - t0) / Math.max(1, t1 - t0);
  const y = (p) => height - 15 - (height - 25) * p;
  ctx.strokeStyle = "#2d3742"; ctx.lineWidth = 1;
  for (const p of [0, 0.5, 1]) { ctx.beginPath(); ctx.moveTo(30, y(p)); ctx.lineTo(width - 10, y(p)); ctx.stroke(); }
  labels.forEach((label, i) => {
    ctx.strokeStyle = COLORS[i % COLORS.length]; ctx.lineWidth = 2; ctx.beginPath();
    history.forEach((h, j) => { const p = h.scores[label] ?? 0; j ? ctx.lineTo(x(h.t), y(p)) : ctx.moveTo(x(h.t), y(p)); });
    ctx.stroke();
  });
  entry.legend.replaceChildren(...labels.map((label, i) => {
    const s = el("span", { text: `\u25A0 ${label}` }); s.style.color = COLORS[i % COLORS.length]; return s;
  }));
}

function onEvent(e) {
  const list = document.getElementById("events");
  let item;
  if (e.kind === "alert") {
    item = el("li", { class: e.phase, "data-rule": e.rule },
      el("strong", { text: `${e.phase.toUpperCase()} ${e.rule}` }),
      ` ${e.source}: "${e.label}" ${e.score.toFixed(3)} at ${e.stream_start.toFixed(1)}-${e.stream_end.toFixed(1)} s`,
      el("br"), el("small", { text: `#${e.seq} ${e.time} latency ${e.latency_ms ?? "-"} ms` }));
  } else {
    item = el("li", { class: "status" }, `#${e.seq} ${e.source}: ${e.status}: ${e.detail ?? ""}`);
    if (e.status === "clip" && e.clip) {
      const name = e.clip.split("/").pop();
      item.append(el("audio", { controls: "", preload: "none", src: withToken(`clips/${encodeURIComponent(name)}`) }));
    }
  }
  list.prepend(item);
  while (list.children.length > 200) list.lastChild.remove();
}

async function start() {
  const response = await fetch(withToken("api/state"));
  const initial = await response.json();
  initial.sources.forEach(sourceCard);
  initial.events.slice().reverse().forEach(onEvent);
  for (const m of initial.latest) (m.scores && m.model_name ? onScores : onWindow)(m);
  if (!initial.try_it) document.getElementById("try-form").hidden = true;
  const channel = new EventSource(withToken("api/events"));
  const badge = document.getElementById("connection");
  channel.onopen = () => { badge.textContent = "live"; badge.className = "badge on"; };
  channel.onerror = () => { badge.textContent = "reconnecting"; badge.className = "badge off"; };
  channel.addEventListener("window", (m) => onWindow(JSON.parse(m.data)));
  channel.addEventListener("scores", (m) => onScores(JSON.parse(m.data)));
  channel.addEventListener("event", (m) => onEvent(JSON.parse(m.data)));
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
  status.textContent = `${result.model}: mean over ${result.windows.length} windows`;
  renderBars(document.getElementById("try-result"), result.probabilities);
});

start();
