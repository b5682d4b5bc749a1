// The operator page: polls the admin API (GET /admin/rollout, /admin/rollout/history) and the
// router's /status with the admin token, draws what it reads, and sends the four commands.
//
// The token is asked for once and kept in sessionStorage (this tab only, gone when it closes).
// It is sent only in the Authorization header: never in a URL, never as a cookie. Everything
// the API says is put on the page as text (textContent), never parsed as HTML.
"use strict";

(function () {
  const TOKEN_KEY = "rollout-admin-token";
  const POLL_MS = 1500;
  const SVG_NS = "http://www.w3.org/2000/svg";
  // Relative to /ui/, so the page also works behind a load balancer that adds a path prefix.
  const API = "../admin/rollout";
  const ROUTER_STATUS = "../status";
  const COLORS = ["#2563eb", "#ea580c", "#16a34a", "#9333ea", "#0891b2", "#be123c"];
  const CONFIRM_TEXT = {
    promote: "Promote: move the rollout on to its next step now?",
    pause: "Pause the rollout where it is?",
    resume: "Resume the rollout?",
    abort: "Abort the rollout? All traffic goes back to the stable version.",
  };

  // The phases each command applies to (app/rollout/machine.py, _ALLOWED); the API refuses
  // the others with a 409, so the page greys those buttons out.
  const ALLOWED = {
    promote: ["progressing", "paused", "promoting"],
    pause: ["progressing"],
    resume: ["paused"],
    abort: ["idle", "progressing", "paused", "promoting"],
  };

  const $ = (id) => document.getElementById(id);
  let timer = null;
  let inFlight = false;
  let lastOk = null;
  const colorOf = new Map();

  // -- the token ------------------------------------------------------------------------------

  function token() {
    return sessionStorage.getItem(TOKEN_KEY);
  }

  function showLogin(message) {
    stopPolling();
    $("dashboard").hidden = true;
    $("sign-out").hidden = true;
    $("login").hidden = false;
    $("live").textContent = "";
    const error = $("login-error");
    error.hidden = !message;
    error.textContent = message || "";
    $("token").value = "";
    $("token").focus();
  }

  function refused(detail) {
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin("Refused: the admin API did not accept this token (401)." +
      (detail ? " " + detail : ""));
  }

  class Refused extends Error {}

  async function call(method, url) {
    const response = await fetch(url, {
      method: method,
      headers: { Authorization: "Bearer " + token(), "x-rollout-actor": "operator-page" },
      cache: "no-store",
      credentials: "omit",
    });
    let body = null;
    try {
      body = await response.json();
    } catch (e) {
      body = null;
    }
    if (response.status === 401) {
      throw new Refused(body && body.error ? body.error : "");
    }
    if (!response.ok) {
      const message = body && body.error ? body.error : response.statusText;
      throw new Error(method + " " + url.replace("../", "/") + ": " + response.status + " " + message);
    }
    return body;
  }

  // -- polling ----------------------------------------------------------------------------------

  function startPolling() {
    $("login").hidden = true;
    $("dashboard").hidden = false;
    $("sign-out").hidden = false;
    stopPolling();
    poll();
    timer = setInterval(poll, POLL_MS);
  }

  function stopPolling() {
    if (timer !== null) {
      clearInterval(timer);
      timer = null;
    }
  }

  async function poll() {
    if (inFlight || !token()) {
      return;
    }
    inFlight = true;
    try {
      const [status, history, router] = await Promise.all([
        call("GET", API),
        call("GET", API + "/history"),
        // The router's view (every deployed version, the weights it applies); optional.
        call("GET", ROUTER_STATUS).catch((e) => (e instanceof Refused ? Promise.reject(e) : null)),
      ]);
      render(status, history, router);
      lastOk = Date.now();
      $("error").hidden = true;
    } catch (e) {
      if (e instanceof Refused) {
        refused(e.message);
        return;
      }
      $("error").hidden = false;
      $("error").textContent = "Cannot read the rollout: " + e.message;
    } finally {
      inFlight = false;
      updateLive();
    }
  }

  function updateLive() {
    const live = $("live");
    if (lastOk === null) {
      live.textContent = "";
      return;
    }
    const age = (Date.now() - lastOk) / 1000;
    live.textContent = age < 5 ? "live" : "stale " + Math.round(age) + " s";
    live.className = age < 5 ? "live ok" : "live stale";
  }

  // -- formatting -------------------------------------------------------------------------------

  function num(x) {
    return typeof x === "number" && isFinite(x) ? x : null;
  }

  function fmt(x, digits) {
    const v = num(x);
    return v === null ? "-" : String(Number(v.toPrecision(digits || 3)));
  }

  function ms(x) {
    const v = num(x);
    return v === null ? "-" : (v < 10 ? v.toFixed(1) : Math.round(v)) + " ms";
  }

  function pct(x) {
    const v = num(x);
    return v === null ? "-" : (v * 100).toFixed(v < 0.01 && v > 0 ? 2 : 1) + "%";
  }

  function clock(seconds) {
    const v = num(seconds);
    return v === null ? "-" : new Date(v * 1000).toISOString().slice(11, 19);
  }

  function el(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) {
      node.textContent = String(text);
    }
    if (className) {
      node.className = className;
    }
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const key of Object.keys(attrs || {})) {
      node.setAttribute(key, String(attrs[key]));
    }
    return node;
  }

  function replaceChildren(node, children) {
    while (node.firstChild) {
      node.removeChild(node.firstChild);
    }
    for (const child of children) {
      node.appendChild(child);
    }
  }

  function color(version) {
    if (!colorOf.has(version)) {
      colorOf.set(version, COLORS[colorOf.size % COLORS.length]);
    }
    return colorOf.get(version);
  }

  function role(status, version) {
    if (version === status.stable) return "stable";
    if (version === status.candidate) return "candidate";
    return "";
  }

  // -- rendering ------------------------------------------------------------------------------

  function render(status, history, router) {
    status = status || {};
    const events = (history && history.events) || [];
    const samples = (history && history.timeline) || [];
    $("model").textContent = status.model || (router && router.model) || "";
    const phase = status.phase || "-";
    $("phase").textContent = phase.replace("_", " ");
    $("phase").className = "phase phase-" + phase;
    $("strategy").textContent = status.strategy || "-";
    $("step").textContent = stepText(status);
    $("generation").textContent = status.generation === undefined ? "-" : status.generation;
    $("message").hidden = !status.message;
    $("message").textContent = status.message || "";
    for (const button of document.querySelectorAll("[data-command]")) {
      const allowed = ALLOWED[button.dataset.command].includes(phase);
      button.disabled = !allowed;
      button.title = allowed ? "" : button.dataset.command + " does not apply to a rollout that is " + phase;
    }
    renderVersions(status, router);
    renderGates(status.verdicts || []);
    renderCharts(samples, events, status);
    renderEvents(events);
  }

  function stepText(status) {
    const total = status.steps_total;
    const index = status.step_index;
    let text = status.step || "-";
    if (typeof total === "number" && total > 0 && typeof index === "number") {
      text = index >= total ? total + "/" + total + " (all steps done)"
        : index + 1 + "/" + total + ": " + (status.step || "");
    }
    const inStep = num(status.time_in_step_s);
    return inStep === null || !status.strategy ? text : text + " (" + Math.round(inStep) + " s in step)";
  }

  function versionOrder(status, groups) {
    const seen = [];
    for (const group of groups) {
      for (const v of Object.keys(group || {})) {
        if (!seen.includes(v)) seen.push(v);
      }
    }
    const first = [status.stable, status.candidate].filter((v) => v && seen.includes(v));
    return first.concat(seen.filter((v) => !first.includes(v)).sort());
  }

  function renderVersions(status, router) {
    // The rollout's weights while one is live; the router's table otherwise (idle, or no
    // controller): what traffic actually does.
    const live = status.weights && Object.keys(status.weights).length ? status.weights : null;
    const weights = live || (router && router.weights) || {};
    const stats = status.versions || {};
    const deployed = (router && router.versions) || {};
    const rows = versionOrder(status, [weights, stats, deployed]).map((v) => {
      const s = stats[v] || {};
      const tr = el("tr");
      tr.dataset.version = v;
      const name = el("td");
      const swatch = el("span", null, "swatch");
      swatch.style.background = color(v);
      name.appendChild(swatch);
      name.appendChild(el("span", v, "version"));
      const r = role(status, v);
      if (r) name.appendChild(el("span", r, "role"));
      tr.appendChild(name);
      const share = Math.max(0, Math.min(100, num(weights[v]) || 0));
      const traffic = el("td", null, "traffic");
      const bar = el("div", null, "bar");
      const fill = el("div", null, "fill");
      fill.style.width = share + "%";
      fill.style.background = color(v);
      bar.appendChild(fill);
      traffic.appendChild(bar);
      traffic.appendChild(el("span", fmt(share, 4) + "%", "share"));
      tr.appendChild(traffic);
      tr.appendChild(el("td", s.rps === undefined ? "-" : fmt(s.rps, 3), "num rps"));
      const errors = el("td", s.requests ? pct(s.error_rate) : "-", "num errors");
      if (num(s.error_rate) > 0) errors.classList.add("bad");
      tr.appendChild(errors);
      tr.appendChild(el("td", ms(s.p50_ms), "num p50"));
      tr.appendChild(el("td", ms(s.p99_ms), "num p99"));
      return tr;
    });
    if (!rows.length) {
      const tr = el("tr");
      const td = el("td", "No version reported yet.", "empty");
      td.colSpan = 6;
      tr.appendChild(td);
      rows.push(tr);
    }
    replaceChildren($("versions").tBodies[0], rows);
  }

  function reading(v) {
    const value = fmt(v.value, 4);
    if (num(v.threshold) === null) return value;
    const gate = String(v.gate || "");
    const bound = /^(max_|fail_fast)|_max$/.test(gate) ? "max" : gate.startsWith("min_") ? "min" : "threshold";
    return value + " (" + bound + " " + fmt(v.threshold, 4) + ")";
  }

  function lift(x, scale) {
    const v = num(x);
    if (v === null) return "-";
    return scale === "relative" ? (v >= 0 ? "+" : "") + (v * 100).toFixed(1) + "%" : (v >= 0 ? "+" : "") + fmt(v, 4);
  }

  function renderGates(verdicts) {
    const gates = verdicts.filter((v) => v.conclusion === undefined || v.conclusion === null);
    const ab = verdicts.filter((v) => v.conclusion !== undefined && v.conclusion !== null);
    const items = gates.map((v) => {
      const li = el("li", null, "gate gate-" + (v.status || "unknown"));
      li.appendChild(el("span", v.status || "?", "verdict"));
      li.appendChild(el("span", v.gate || "?", "gate-name"));
      li.appendChild(el("span", reading(v), "reading"));
      if (v.reason) li.appendChild(el("span", v.reason, "reason"));
      return li;
    });
    if (!items.length) items.push(el("li", "No verdicts yet.", "empty"));
    replaceChildren($("gates"), items);
    $("ab").hidden = !ab.length;
    replaceChildren($("ab-list"), ab.map((v) => {
      const li = el("li", null, "gate gate-" + (v.status || "unknown"));
      li.appendChild(el("span", String(v.conclusion).replace(/_/g, " "), "verdict"));
      li.appendChild(el("span", (v.gate || "?") + (v.outcome ? " · " + v.outcome : ""), "gate-name"));
      let text = "lift " + lift(v.lift, v.scale);
      if (v.low !== null && v.low !== undefined || v.high !== null && v.high !== undefined) {
        text += " [" + lift(v.low, v.scale) + ", " + lift(v.high, v.scale) + "]";
        if (num(v.confidence) !== null) text += " " + Math.round(v.confidence * 100) + "% always-valid";
      }
      li.appendChild(el("span", text, "reading interval"));
      if (v.reason) li.appendChild(el("span", v.reason, "reason"));
      return li;
    }));
  }

  // -- the timeline -----------------------------------------------------------------------------

  const PANELS = [
    // minTop: the scale's least top, so a flat zero line does not fill the panel.
    { title: "Traffic (%)", value: (s, v) => num((s.weights || {})[v]), fixedMax: 100, minTop: 100, label: (x) => fmt(x, 3) + "%" },
    { title: "Error rate", value: (s, v) => num(((s.versions || {})[v] || {}).error_rate), fixedMax: null, minTop: 0.01, label: pct },
    { title: "p99 latency", value: (s, v) => num(((s.versions || {})[v] || {}).p99_ms), fixedMax: null, minTop: 10, label: ms },
  ];
  // Drawn at the container's width in pixels (not scaled), so text stays legible on a phone.
  let W = 600;
  const H = 110;
  const PAD = { left: 52, right: 8, top: 18, bottom: 16 };

  function renderCharts(samples, events, status) {
    const charts = $("charts");
    if (!samples.length) {
      replaceChildren(charts, [el("p", "No samples yet: the controller samples once a second.", "empty")]);
      replaceChildren($("legend"), []);
      return;
    }
    W = Math.max(280, Math.round(charts.clientWidth || 600));
    const t0 = samples[0].time_s;
    const t1 = Math.max(samples[samples.length - 1].time_s, t0 + 1);
    const seen = {};
    for (const s of samples) {
      Object.assign(seen, s.weights || {}, s.versions || {});
    }
    const versions = versionOrder(status, [seen]);
    replaceChildren($("legend"), versions.map((v) => {
      const item = el("span", null, "legend-item");
      const swatch = el("span", null, "swatch");
      swatch.style.background = color(v);
      item.appendChild(swatch);
      item.appendChild(el("span", v));
      return item;
    }));
    const x = (t) => PAD.left + ((t - t0) / (t1 - t0)) * (W - PAD.left - PAD.right);
    const panels = PANELS.map((panel) => {
      // The highest reading gets the dashed line and the top label; 10% headroom above it.
      let top = panel.fixedMax;
      if (top === null) {
        top = 0;
        for (const s of samples) for (const v of versions) top = Math.max(top, panel.value(s, v) || 0);
        top = Math.max(top, panel.minTop);
      }
      const max = panel.fixedMax === null ? top * 1.1 : top;
      const y = (value) => PAD.top + (1 - value / max) * (H - PAD.top - PAD.bottom);
      const chart = svg("svg", { viewBox: "0 0 " + W + " " + H, class: "chart", role: "img",
        "aria-label": panel.title });
      const title = svg("text", { x: PAD.left, y: 12, class: "chart-title" });
      title.textContent = panel.title;
      chart.appendChild(title);
      chart.appendChild(svg("line", { x1: PAD.left, x2: W - PAD.right, y1: y(0), y2: y(0), class: "axis" }));
      chart.appendChild(svg("line", { x1: PAD.left, x2: W - PAD.right, y1: y(top), y2: y(top), class: "grid" }));
      for (const [value, text] of [[0, panel.label(0)], [top, panel.label(top)]]) {
        const label = svg("text", { x: PAD.left - 4, y: y(value) + 4, class: "tick", "text-anchor": "end" });
        label.textContent = text;
        chart.appendChild(label);
      }
      for (const e of events) {
        const mx = x(Math.max(t0, e.time_s));
        const marker = svg("line", { x1: mx, x2: mx, y1: PAD.top, y2: H - PAD.bottom,
          class: "event event-" + e.to_phase });
        const tip = svg("title");
        tip.textContent = clock(e.time_s) + " " + e.from_phase + " → " + e.to_phase + ": " + e.reason;
        marker.appendChild(tip);
        chart.appendChild(marker);
      }
      for (const v of versions) {
        // A gap where a sample has no reading (no requests in that second).
        let d = "";
        let pen = "M";
        for (const s of samples) {
          const value = panel.value(s, v);
          if (value === null) {
            pen = "M";
            continue;
          }
          d += pen + x(s.time_s).toFixed(1) + " " + y(Math.min(value, max)).toFixed(1) + " ";
          pen = "L";
        }
        if (d) {
          chart.appendChild(svg("path", { d: d, class: "series", stroke: color(v), "data-version": v }));
        }
      }
      return chart;
    });
    // The gates' verdict on each sample: a strip of cells, red where any gate failed.
    const strip = svg("svg", { viewBox: "0 0 " + W + " 30", class: "chart strip", role: "img",
      "aria-label": "gate verdicts" });
    const label = svg("text", { x: PAD.left - 4, y: 14, class: "tick", "text-anchor": "end" });
    label.textContent = "gates";
    strip.appendChild(label);
    samples.forEach((s, i) => {
      const next = i + 1 < samples.length ? samples[i + 1].time_s : t1;
      const verdicts = Object.values(s.gates || {});
      const state = verdicts.includes("failed") ? "failed" : verdicts.includes("pending") ? "pending"
        : verdicts.length ? "passed" : "none";
      strip.appendChild(svg("rect", { x: x(s.time_s), y: 4, height: 14,
        width: Math.max(0.5, x(next) - x(s.time_s)), class: "cell cell-" + state }));
    });
    const start = svg("text", { x: PAD.left, y: 29, class: "tick" });
    start.textContent = clock(t0);
    const end = svg("text", { x: W - PAD.right, y: 29, class: "tick", "text-anchor": "end" });
    end.textContent = clock(t1) + " UTC";
    strip.appendChild(start);
    strip.appendChild(end);
    panels.push(strip);
    replaceChildren(charts, panels);
  }

  function renderEvents(events) {
    const items = events.slice().reverse().map((e) => {
      const li = el("li", null, "event-item phase-" + e.to_phase);
      li.appendChild(el("span", clock(e.time_s), "time"));
      li.appendChild(el("span", e.from_phase + " → " + e.to_phase, "transition"));
      li.appendChild(el("span", "step " + (e.step_index + 1) + " · " + fmt(e.weight, 4) + "%", "where"));
      li.appendChild(el("span", e.reason || "", "reason"));
      return li;
    });
    if (!items.length) items.push(el("li", "No events yet.", "empty"));
    replaceChildren($("events"), items);
  }

  // -- commands -------------------------------------------------------------------------------

  function confirmCommand(command) {
    const dialog = $("confirm");
    $("confirm-text").textContent = CONFIRM_TEXT[command];
    $("confirm-ok").textContent = command.charAt(0).toUpperCase() + command.slice(1);
    return new Promise((resolve) => {
      const done = (answer) => {
        $("confirm-ok").onclick = null;
        $("confirm-cancel").onclick = null;
        dialog.onclose = null;
        if (dialog.open) dialog.close();
        resolve(answer);
      };
      $("confirm-ok").onclick = () => done(true);
      $("confirm-cancel").onclick = () => done(false);
      dialog.onclose = () => done(false);
      dialog.showModal();
    });
  }

  async function command(name) {
    if (!(await confirmCommand(name))) return;
    const result = $("command-result");
    result.hidden = false;
    result.className = "result";
    result.textContent = name + "…";
    try {
      const body = await call("POST", API + "/" + name);
      result.textContent = name + ": done" + (body && body.phase ? " (phase " + body.phase + ")" : "");
      result.classList.add("ok");
    } catch (e) {
      if (e instanceof Refused) {
        refused(e.message);
        return;
      }
      result.textContent = name + " refused: " + e.message;
      result.classList.add("bad");
    }
    poll();
  }

  // -- start --------------------------------------------------------------------------------------

  document.addEventListener("DOMContentLoaded", () => {
    $("login-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const value = $("token").value.trim();
      $("token").value = "";
      if (!value) return;
      sessionStorage.setItem(TOKEN_KEY, value);
      startPolling();
    });
    $("sign-out").addEventListener("click", () => {
      sessionStorage.removeItem(TOKEN_KEY);
      showLogin("");
    });
    for (const button of document.querySelectorAll("[data-command]")) {
      button.addEventListener("click", () => command(button.dataset.command));
    }
    setInterval(updateLive, 1000);
    if (token()) {
      startPolling();
    } else {
      showLogin("");
    }
  });
})();
