// lk-vllm dashboard: polls /v1/speculative/stats and /v1/speculative/history and draws SVG line/bar charts.
// No external resources. If the server has an API key, open /dashboard#key=<API key>.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const COLORS = ["#2f6fde", "#e0692d", "#2a9d5b", "#a03fc2", "#c9343a", "#7a8a18", "#1b9aaa", "#8a5a44"];
const POLL_MS = 2000;
const W = 640, H = 220, PAD = { left: 44, right: 12, top: 12, bottom: 26 };

function apiKey() {
  const match = location.hash.match(/key=([^&]+)/);
  if (match) { sessionStorage.setItem("lkKey", decodeURIComponent(match[1])); }
  return sessionStorage.getItem("lkKey");
}

async function getJSON(path) {
  const key = apiKey();
  const response = await fetch(path, { headers: key ? { Authorization: "Bearer " + key } : {} });
  if (!response.ok) { throw new Error(path + ": HTTP " + response.status); }
  return response.json();
}

function el(name, attrs, parent) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs || {})) { node.setAttribute(k, v); }
  if (parent) { parent.appendChild(node); }
  return node;
}

function clear(svg) { while (svg.firstChild) { svg.removeChild(svg.firstChild); } }

function noData(svg, text) {
  clear(svg);
  el("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "nodata" }, svg).textContent = text;
}

function niceMax(value) {
  if (!(value > 0)) { return 1; }
  const step = Math.pow(10, Math.floor(Math.log10(value)));
  for (const m of [1, 2, 2.5, 5, 10]) { if (m * step >= value) { return m * step; } }
  return 10 * step;
}

// series: [{name, color, points: [[t, y], ...]}]; y may be null (gap).
function lineChart(svg, series, opts) {
  const all = series.flatMap(s => s.points.filter(p => p[1] !== null && Number.isFinite(p[1])));
  if (all.length === 0) { noData(svg, opts.empty || "no data yet"); return; }
  clear(svg);
  const t0 = Math.min(...all.map(p => p[0])), t1 = Math.max(...all.map(p => p[0]));
  const yMin = opts.yMin !== undefined ? opts.yMin : 0;
  const yMax = opts.yMax !== undefined ? opts.yMax : niceMax(Math.max(...all.map(p => p[1])) * 1.1);
  const x = t => PAD.left + (t1 === t0 ? (W - PAD.left - PAD.right) / 2 : (t - t0) / (t1 - t0) * (W - PAD.left - PAD.right));
  const y = v => H - PAD.bottom - (v - yMin) / (yMax - yMin) * (H - PAD.top - PAD.bottom);
  for (let i = 0; i <= 4; i++) {
    const v = yMin + (yMax - yMin) * i / 4;
    el("line", { x1: PAD.left, x2: W - PAD.right, y1: y(v), y2: y(v), class: i ? "grid" : "axis" }, svg);
    el("text", { x: PAD.left - 6, y: y(v) + 4, "text-anchor": "end" }, svg).textContent = v.toFixed(yMax < 2 ? 2 : 1);
  }
  if (opts.reference !== undefined) {
    el("line", { x1: PAD.left, x2: W - PAD.right, y1: y(opts.reference), y2: y(opts.reference),
      stroke: "#999", "stroke-dasharray": "4 3" }, svg);
  }
  const fmt = t => new Date(t * 1000).toLocaleTimeString();
  el("text", { x: PAD.left, y: H - 8 }, svg).textContent = fmt(t0);
  el("text", { x: W - PAD.right, y: H - 8, "text-anchor": "end" }, svg).textContent = fmt(t1);
  series.forEach((s, index) => {
    let d = "", pen = "M";
    for (const [t, v] of s.points) {
      if (v === null || !Number.isFinite(v)) { pen = "M"; continue; }
      d += pen + x(t).toFixed(1) + " " + y(v).toFixed(1) + " ";
      pen = "L";
      el("circle", { cx: x(t), cy: y(v), r: 2.2, fill: s.color, class: "point" }, svg);
    }
    if (d) { el("path", { d: d, fill: "none", stroke: s.color, "stroke-width": 2, class: "series" }, svg); }
    if (series.length > 1) {
      el("rect", { x: PAD.left + 8 + index * 78, y: PAD.top, width: 10, height: 10, fill: s.color }, svg);
      el("text", { x: PAD.left + 22 + index * 78, y: PAD.top + 9 }, svg).textContent = s.name;
    }
  });
}

function barChart(svg, values) {
  if (!values || values.length === 0) { noData(svg, "no drafts in the last 60 s"); return; }
  clear(svg);
  const slot = (W - PAD.left - PAD.right) / values.length;
  const y = v => H - PAD.bottom - v * (H - PAD.top - PAD.bottom);
  for (let i = 0; i <= 4; i++) {
    el("line", { x1: PAD.left, x2: W - PAD.right, y1: y(i / 4), y2: y(i / 4), class: i ? "grid" : "axis" }, svg);
    el("text", { x: PAD.left - 6, y: y(i / 4) + 4, "text-anchor": "end" }, svg).textContent = (i / 4).toFixed(2);
  }
  values.forEach((v, k) => {
    const x0 = PAD.left + k * slot + slot * 0.15;
    el("rect", { x: x0, y: y(v), width: slot * 0.7, height: Math.max(0, y(0) - y(v)), fill: COLORS[k % COLORS.length], class: "bar" }, svg);
    el("text", { x: x0 + slot * 0.35, y: y(v) - 4, "text-anchor": "middle" }, svg).textContent = v.toFixed(2);
    el("text", { x: x0 + slot * 0.35, y: H - 8, "text-anchor": "middle" }, svg).textContent = "position " + (k + 1);
  });
}

// histogram: {upper_bounds: [..., "+Inf"], counts: {all: [...]}}, counts per bucket (not cumulative).
function histogramChart(svg, histogram, missing) {
  const counts = histogram ? histogram.counts.all : [];
  const total = counts.reduce((a, b) => a + b, 0);
  if (total === 0) { noData(svg, missing || "no finished requests in the last 60 s"); return; }
  clear(svg);
  // Only the buckets from the first to the last non-empty one: K bounds what a request can reach.
  const first = counts.findIndex(c => c > 0), last = counts.length - 1 - [...counts].reverse().findIndex(c => c > 0);
  const shown = counts.slice(first, last + 1), bounds = histogram.upper_bounds.slice(first, last + 1);
  const top = niceMax(Math.max(...shown));
  const slot = (W - PAD.left - PAD.right) / shown.length;
  const y = v => H - PAD.bottom - v / top * (H - PAD.top - PAD.bottom);
  for (let i = 0; i <= 4; i++) {
    el("line", { x1: PAD.left, x2: W - PAD.right, y1: y(top * i / 4), y2: y(top * i / 4), class: i ? "grid" : "axis" }, svg);
    el("text", { x: PAD.left - 6, y: y(top * i / 4) + 4, "text-anchor": "end" }, svg).textContent = String(Math.round(top * i / 4));
  }
  shown.forEach((c, k) => {
    const x0 = PAD.left + k * slot + slot * 0.1;
    el("rect", { x: x0, y: y(c), width: slot * 0.8, height: Math.max(0, y(0) - y(c)), fill: COLORS[0], class: "histogram-bar" }, svg);
    el("text", { x: x0 + slot * 0.4, y: H - 8, "text-anchor": "middle" }, svg).textContent = "≤" + bounds[k];
  });
}

function byMode(entries, aggregation) {
  const part = m => { const e = entries.find(x => x.aggregation === aggregation && x.sampling === m);
    return e && e.value !== null ? m.replace("_", " ") + " " + fmt(e.value, 2) + " (" + e.requests + " req)" : null; };
  return ["temperature_0", "sampled"].map(part).filter(Boolean).join(" · ") || "no finished requests";
}

function driftBanner(drift) {
  const banner = document.getElementById("drift");
  if (!drift || !drift.drifting) { banner.hidden = true; document.body.dataset.drift = "no"; return; }
  banner.hidden = false;
  document.body.dataset.drift = "yes";
  banner.textContent = "Acceptance drift: " + drift.checks.filter(c => c.drifting).map(c =>
    c.sampling.replace("_", " ") + " acceptance length " + fmt(c.observed, 2) + " over the last " + drift.window_seconds +
    " s (" + c.num_drafts + " drafts) is " + fmt(100 * c.ratio, 0, "%") + " of the expected " + fmt(c.expected, 2) +
    " (" + c.expected_source + "; alarm below " + fmt(100 * drift.threshold, 0, "%") + ")").join("; ");
}

function fmt(value, digits, suffix) {
  return value === null || value === undefined || !Number.isFinite(value) ? "–" : value.toFixed(digits) + (suffix || "");
}

async function refresh() {
  try {
    const [stats, history] = await Promise.all([getJSON("/v1/speculative/stats"), getJSON("/v1/speculative/history")]);
    const d = stats.drafter || {};
    document.getElementById("drafter").textContent =
      "live drafter: " + (d.path || "?") + " · " + (d.architecture || stats.method) + (d.loss ? " · loss " + d.loss : "") +
      " · method " + stats.method + " · K=" + stats.num_speculative_tokens +
      " · sampling: draft " + (stats.sampling.draft_sample_method || "?") + ", rejection " + (stats.sampling.rejection_sample_method || "?");
    document.getElementById("al").textContent = fmt(stats.acceptance_length, 2);
    document.getElementById("al-modes").textContent = byMode(stats.acceptance_lengths, "pooled");
    document.getElementById("al-requests").textContent = fmt(stats.acceptance_length_mean_of_request_means, 2);
    document.getElementById("al-requests-modes").textContent = stats.per_request.source ?
      byMode(stats.acceptance_lengths, "mean_of_request_means") : stats.per_request.missing;
    driftBanner(stats.drift);
    document.getElementById("speedup").textContent = stats.baseline && stats.baseline.kind === "none" ? "no baseline" : fmt(stats.speedup, 2, "×");
    document.getElementById("tps").textContent = fmt(stats.tokens_per_s, 1);
    const s = stats.since_start;
    document.getElementById("since").textContent = s.output_tokens + " tokens, " + s.num_drafts + " drafts, AL " +
      fmt(s.acceptance_length, 2) + ", speed-up " + fmt(s.speedup, 2, "×");
    const points = history.points;
    lineChart(document.getElementById("chart-al"), [
      { name: "pooled", color: COLORS[0], points: points.map(p => [p.t, p.acceptance_length]) },
      { name: "req. means", color: COLORS[2], points: points.map(p => [p.t, p.acceptance_length_mean_of_request_means]) }],
      { yMin: 1, yMax: niceMax(Math.max(2, ...points.map(p => Math.max(p.acceptance_length || 0, p.acceptance_length_mean_of_request_means || 0))) * 1.05) });
    lineChart(document.getElementById("chart-speedup"), [{ name: "speed-up", color: COLORS[1],
      points: points.map(p => [p.t, p.speedup]) }], { reference: 1, empty: history.baseline ? "no timed decode steps yet" : "no baseline profile (run lk-vllm calibrate)" });
    const K = history.num_speculative_tokens;
    lineChart(document.getElementById("chart-positions"), Array.from({ length: K }, (_, k) => ({
      name: "pos " + (k + 1), color: COLORS[k % COLORS.length],
      points: points.map(p => [p.t, p.per_position_acceptance ? p.per_position_acceptance[k] : null]) })), { yMin: 0, yMax: 1 });
    barChart(document.getElementById("chart-bars"), stats.per_position_acceptance);
    histogramChart(document.getElementById("chart-requests"), stats.request_acceptance_histogram,
      stats.per_request.source ? null : stats.per_request.missing);
    document.getElementById("status").textContent = "updated " + new Date().toLocaleTimeString() + " · " + points.length + " intervals";
    document.body.dataset.points = String(points.length);
  } catch (error) {
    document.getElementById("status").textContent = "error: " + error.message;
  }
}

refresh();
setInterval(refresh, POLL_MS);
