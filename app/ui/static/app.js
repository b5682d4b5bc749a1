// The operator page: polls the admin API (GET /admin/rollout, /admin/rollout/history) and the
// router's /status with the admin token, draws what it reads, and sends the six commands.
//
// The token is asked for once and kept in sessionStorage (this tab only, gone when it closes).
// It is sent only in the Authorization header: never in a URL, never as a cookie. Everything
// the API says is put on the page as text (textContent), never parsed as HTML.
//
// Every key of the status may be missing or null (an older controller, no waves, no lift
// gate): each section reads what is there and hides itself otherwise.
"use strict";

(function () {
  const TOKEN_KEY = "rollout-admin-token";
  const POLL_MS = 1500;
  const SVG_NS = "http://www.w3.org/2000/svg";
  // Relative to /ui/, so the page also works behind a load balancer that adds a path prefix.
  const API = "../admin/rollout";
  const ROUTER_STATUS = "../status";
  const COLORS = ["#2563eb", "#ea580c", "#16a34a", "#9333ea", "#0891b2", "#be123c"];
  // Region waves older than this are marked stale (the publisher writes every few seconds).
  const WAVES_STALE_S = 30;
  // The command names are the admin API's path segments (POST /admin/rollout/<command>).
  const CONFIRM_TEXT = {
    start: "Start: begin a new rollout of the declared plan, from its first step?",
    promote: "Promote: move the rollout on to its next step now?",
    "promote-full": "Promote full: send all traffic to the candidate now, skipping the " +
      "remaining steps and their gates?",
    pause: "Pause the rollout where it is?",
    resume: "Resume the rollout?",
    abort: "Abort the rollout? All traffic goes back to the stable version.",
  };

  // The phases each command applies to (app/rollout/machine.py, _ALLOWED; start: the
  // controller's own rule, a rollout that has ended); the API refuses the others with a 409,
  // so the page greys those buttons out. Every command needs a declared plan.
  const ALLOWED = {
    start: ["succeeded", "rolled_back", "aborted"],
    promote: ["progressing", "paused", "promoting"],
    "promote-full": ["progressing", "paused", "promoting"],
    pause: ["progressing"],
    resume: ["paused"],
    abort: ["idle", "progressing", "paused", "promoting"],
  };

  const $ = (id) => document.getElementById(id);
  let timer = null;
  let inFlight = false;
  let commandInFlight = null;  // the command whose answer the page waits for (renderCommands)
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

  // A fresh Idempotency-Key per command: one the ingress re-sends (its Router died before
  // answering) is applied once, so a promote never skips a step.
  function idempotencyKey() {
    if (window.crypto && typeof window.crypto.randomUUID === "function") {
      return window.crypto.randomUUID();
    }
    const bytes = new Uint8Array(16);
    window.crypto.getRandomValues(bytes);  // also outside a secure context (plain http)
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  // A command whose connection dropped before the answer (its Router replica died under it),
  // or that got a 503 or the ingress's own 5xx page, is sent again with the same
  // Idempotency-Key for up to RETRY_FOR_MS (the router's Retry-After sets the pause, at most
  // 5 s): the controller applies it once, as it does for the `rollout` CLI's re-sends.
  const RETRY_FOR_MS = 10000;
  const RETRY_PAUSES_MS = [250, 500, 1000, 2000];

  function sleep(ms) {
    return new Promise((resolve) => setTimeout(resolve, ms));
  }

  // Why an answer (or a dropped connection: response null) is worth sending again, or null.
  function transient(response, body) {
    const jsonError = body !== null && typeof body === "object" && "error" in body;
    if (response === null) return "the connection dropped before an answer";
    if (response.status === 503) return "503 " + (jsonError ? body.error : "unavailable");
    if ([500, 502, 504].includes(response.status) && !jsonError) {
      return response.status + " from the ingress";
    }
    return null;
  }

  function retryAfterMs(response, pauseMs) {
    const value = response === null ? NaN : parseFloat(response.headers.get("retry-after"));
    // Between 0.1 s (a Retry-After of 0 must not make a tight loop) and 5 s.
    return Number.isFinite(value) && value >= 0 ? Math.min(Math.max(value, 0.1), 5) * 1000 : pauseMs;
  }

  // `onRetry(reason, pauseMs)`: told before each re-send (commands only; a poll just polls again).
  async function call(method, url, onRetry) {
    const headers = { Authorization: "Bearer " + token(), "x-rollout-actor": "operator-page" };
    if (method === "POST") {
      headers["Idempotency-Key"] = idempotencyKey();
    }
    const deadline = Date.now() + RETRY_FOR_MS;
    for (let sends = 1; ; sends++) {
      let response = null;
      let failure = null;
      let body = null;
      try {
        response = await fetch(url, {
          method: method,
          headers: headers,
          cache: "no-store",
          credentials: "omit",
        });
        try {
          body = JSON.parse(await response.text());
        } catch (e) {
          body = null;
        }
      } catch (e) {
        response = null;
        failure = e;
      }
      const reason = method === "POST" ? transient(response, body) : null;
      if (reason !== null) {
        const pauseMs = retryAfterMs(response, RETRY_PAUSES_MS[Math.min(sends, RETRY_PAUSES_MS.length) - 1]);
        if (Date.now() + pauseMs <= deadline) {
          if (onRetry) onRetry(reason, pauseMs);
          await sleep(pauseMs);
          continue;
        }
      }
      if (failure !== null) {
        throw new Error(method + " " + url.replace("../", "/") + ": " + failure.message);
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
    const phase = typeof status.phase === "string" ? status.phase : "-";
    $("phase").textContent = phase.replace(/_/g, " ");
    $("phase").className = "phase phase-" + phase;
    $("strategy").textContent = status.strategy || "-";
    $("step").textContent = stepText(status);
    $("generation").textContent = status.generation === undefined || status.generation === null
      ? "-" : status.generation;
    $("message").hidden = !status.message;
    $("message").textContent = status.message || "";
    renderCommands(status, phase);
    // One section that cannot draw what it got must not blank the others; the browser's
    // console says which and why.
    section("versions", () => renderVersions(status, router));
    section("regions", () => renderWaves(status.waves, status));
    section("gates", () => renderGates(Array.isArray(status.verdicts) ? status.verdicts : []));
    section("A/B lift", () => renderLift(status.ab_series, status.verdicts));
    section("timeline", () => renderCharts(samples, events, status));
    section("notifications", () => renderNotifications(status.notifications));
    section("history", () => renderEvents(events));
  }

  function section(name, draw) {
    try {
      draw();
    } catch (e) {
      console.error("operator page: cannot draw the " + name + " section:", e);
    }
  }

  function renderCommands(status, phase) {
    // A controller without a plan reports phase idle; it takes no command at all.
    const declared = Boolean(status.strategy);
    for (const button of document.querySelectorAll("[data-command]")) {
      const name = button.dataset.command;
      const allowed = declared && (ALLOWED[name] || []).includes(phase);
      // While a command is out (re-sent for up to RETRY_FOR_MS), a second click would be a
      // new command with a new key: every button waits for its answer.
      button.disabled = !allowed || commandInFlight !== null;
      button.title = commandInFlight !== null ? "waiting for " + commandInFlight + " to be answered"
        : allowed ? ""
        : !declared ? name + ": no rollout plan is declared"
        : name + " does not apply to a rollout that is " + phase.replace(/_/g, " ");
    }
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
    // Once a rollout has succeeded the candidate is the stable version: list it once.
    const first = [status.stable, status.candidate]
      .filter((v, i, both) => v && seen.includes(v) && both.indexOf(v) === i);
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

  // -- the A/B lift over time ---------------------------------------------------------------------

  const LIFT_H = 130;

  function renderLift(series, verdicts) {
    const box = $("ab-chart");
    const points = (Array.isArray(series) ? series : [])
      .filter((p) => p && num(p.t) !== null)
      .sort((a, b) => a.t - b.t);
    box.hidden = !points.length;
    if (!points.length) {
      replaceChildren(box, []);
      return;
    }
    $("ab").hidden = false;
    const first = (Array.isArray(verdicts) ? verdicts : [])
      .find((v) => v && v.conclusion !== undefined && v.conclusion !== null);
    const scale = first ? first.scale : undefined;
    const w = Math.max(280, Math.round(box.clientWidth || 600));
    const t0 = points[0].t;
    const t1 = Math.max(points[points.length - 1].t, t0 + 1);
    // The scale holds every reading, its interval and zero (the line that matters).
    let lo = 0;
    let hi = 0;
    for (const p of points) {
      for (const value of [p.lift, p.low, p.high]) {
        const v = num(value);
        if (v !== null) {
          lo = Math.min(lo, v);
          hi = Math.max(hi, v);
        }
      }
    }
    const dataLo = lo;
    const dataHi = hi;
    const span = hi - lo || 0.01;
    lo -= span * 0.08;
    hi += span * 0.08;
    const x = (t) => PAD.left + ((t - t0) / (t1 - t0)) * (w - PAD.left - PAD.right);
    const y = (v) => PAD.top + ((hi - v) / (hi - lo)) * (LIFT_H - PAD.top - PAD.bottom);
    const chart = svg("svg", { viewBox: "0 0 " + w + " " + LIFT_H, class: "chart lift-chart",
      role: "img", "aria-label": "A/B lift over time" });
    const title = svg("text", { x: PAD.left, y: 12, class: "chart-title" });
    title.textContent = "Lift and its interval";
    chart.appendChild(title);
    // The interval: one shaded band per run of samples that have both ends.
    let run = [];
    const bands = [];
    for (const p of points) {
      if (num(p.low) !== null && num(p.high) !== null) {
        run.push(p);
      } else if (run.length) {
        bands.push(run);
        run = [];
      }
    }
    if (run.length) bands.push(run);
    for (const band of bands) {
      const upper = band.map((p) => x(p.t).toFixed(1) + " " + y(p.high).toFixed(1));
      const lower = band.slice().reverse().map((p) => x(p.t).toFixed(1) + " " + y(p.low).toFixed(1));
      if (band.length === 1) {
        // A single sample: a short vertical bar, so it is still seen.
        chart.appendChild(svg("line", { x1: x(band[0].t), x2: x(band[0].t), y1: y(band[0].high),
          y2: y(band[0].low), class: "lift-band-single" }));
      } else {
        chart.appendChild(svg("path", { d: "M" + upper.concat(lower).join(" L") + " Z", class: "lift-band" }));
      }
    }
    chart.appendChild(svg("line", { x1: PAD.left, x2: w - PAD.right, y1: y(0), y2: y(0), class: "zero" }));
    const ticks = [[0, "0"]];
    // The extremes, where they are far enough from zero (in pixels) not to overprint it.
    if (y(0) - y(dataHi) > 12) ticks.push([dataHi, lift(dataHi, scale)]);
    if (y(dataLo) - y(0) > 12) ticks.push([dataLo, lift(dataLo, scale)]);
    for (const [value, text] of ticks) {
      const label = svg("text", { x: PAD.left - 4, y: y(value) + 4, class: "tick", "text-anchor": "end" });
      label.textContent = text;
      chart.appendChild(label);
    }
    let d = "";
    let pen = "M";
    for (const p of points) {
      const v = num(p.lift);
      if (v === null) {
        pen = "M";
        continue;
      }
      d += pen + x(p.t).toFixed(1) + " " + y(v).toFixed(1) + " ";
      pen = "L";
    }
    if (d) chart.appendChild(svg("path", { d: d, class: "series lift-line" }));
    const lastLift = points.slice().reverse().find((p) => num(p.lift) !== null);
    if (lastLift && !d.includes("L")) {
      chart.appendChild(svg("circle", { cx: x(lastLift.t), cy: y(lastLift.lift), r: 3, class: "lift-dot" }));
    }
    // The latest verdict, top right.
    const judged = points.slice().reverse().find((p) => p.verdict !== undefined && p.verdict !== null);
    const verdict = judged ? String(judged.verdict) : "no verdict yet";
    const tag = svg("text", { x: w - PAD.right, y: 12, "text-anchor": "end",
      class: "lift-verdict verdict-" + cssName(verdict) });
    tag.textContent = verdict.replace(/_/g, " ") +
      (lastLift ? " · lift " + lift(lastLift.lift, scale) : "");
    chart.appendChild(tag);
    const start = svg("text", { x: PAD.left, y: LIFT_H - 2, class: "tick" });
    start.textContent = clock(t0);
    const end = svg("text", { x: w - PAD.right, y: LIFT_H - 2, class: "tick", "text-anchor": "end" });
    end.textContent = clock(t1) + " UTC";
    chart.appendChild(start);
    chart.appendChild(end);
    replaceChildren(box, [chart]);
  }

  // A value from the API made safe to use in a class name.
  function cssName(value) {
    return String(value).toLowerCase().replace(/[^a-z0-9_-]+/g, "_");
  }

  // -- region waves -----------------------------------------------------------------------------

  function weightsBar(weights) {
    // Weights as the controller reports them (percent); drawn as shares of their sum, so
    // fractions would draw the same.
    const entries = Object.entries(weights || {})
      .map(([v, w]) => [v, Math.max(0, num(w) || 0)])
      .filter(([, w]) => w > 0);
    const total = entries.reduce((sum, [, w]) => sum + w, 0);
    const wrap = el("span", null, "region-traffic");
    if (!entries.length) {
      wrap.appendChild(el("span", "no traffic reported", "weights-text"));
      return wrap;
    }
    const bar = el("span", null, "stack");
    const parts = [];
    for (const [v, w] of entries) {
      const share = (w / total) * 100;
      const fill = el("span", null, "fill");
      fill.style.width = share + "%";
      fill.style.background = color(v);
      fill.title = v + " " + fmt(share, 3) + "%";
      bar.appendChild(fill);
      parts.push(v + " " + fmt(share, 3) + "%");
    }
    wrap.appendChild(bar);
    wrap.appendChild(el("span", parts.join(" · "), "weights-text"));
    return wrap;
  }

  function badge(state) {
    const text = state === undefined || state === null ? "unknown" : String(state);
    return el("span", text.replace(/_/g, " "), "badge state-" + cssName(text));
  }

  function renderWaves(doc, status) {
    const card = $("regions-card");
    if (!doc || typeof doc !== "object") {
      card.hidden = true;
      replaceChildren($("waves"), []);
      return;
    }
    card.hidden = false;
    // The controller's wall clock (the status's updated_at), so a skewed browser clock does
    // not make fresh data look stale; the browser's when the status has none.
    const now = num(status.updated_at) !== null ? status.updated_at : Date.now() / 1000;
    const summary = [];
    if (doc.name) summary.push(el("span", doc.name, "waves-name"));
    if (doc.phase) summary.push(badge(doc.phase));
    const waves = Array.isArray(doc.waves) ? doc.waves : [];
    if (num(doc.current_wave) !== null && waves.length) {
      summary.push(el("span", "wave " + (doc.current_wave + 1) + " of " + waves.length));
    }
    if (doc.on_failure) {
      summary.push(el("span", "on failure: " + String(doc.on_failure).replace(/_/g, " "), "muted"));
    }
    // When this controller received it (its own clock, like updated_at), so an orchestrator
    // whose clock is skewed does not make fresh data look stale; else when it was published.
    const received = num(doc.received_at) !== null ? doc.received_at : num(doc.published_at);
    const age = received === null ? null : Math.max(0, now - received);
    const asOf = el("span", age === null ? "age unknown" : "as of " + Math.round(age) + " s ago",
      "as-of" + (age === null || age > WAVES_STALE_S ? " stale" : ""));
    if (age !== null && age > WAVES_STALE_S) asOf.textContent += " (stale)";
    asOf.id = "waves-age";
    summary.push(asOf);
    replaceChildren($("waves-summary"), summary);
    const groups = waves.map((wave, i) => {
      wave = wave || {};
      const index = num(wave.index) !== null ? wave.index : i;
      const group = el("div", null, "wave");
      group.dataset.wave = String(index);
      if (index === doc.current_wave) group.classList.add("current");
      const head = el("h3", null, "wave-head");
      head.appendChild(el("span", "Wave " + (index + 1)));
      head.appendChild(badge(wave.state));
      const bakeUntil = num(wave.bake_until);
      if (bakeUntil !== null && bakeUntil > now) {
        head.appendChild(el("span", "bake " + duration(bakeUntil - now) + " left", "bake"));
      }
      group.appendChild(head);
      const list = el("ul", null, "regions");
      for (const r of Array.isArray(wave.regions) ? wave.regions : []) {
        if (!r || typeof r !== "object") continue;
        const li = el("li", null, "region");
        li.dataset.region = String(r.region);
        const top = el("div", null, "region-top");
        top.appendChild(el("span", r.region === undefined || r.region === null ? "?" : r.region, "region-name"));
        const b = badge(r.state);
        b.classList.add("region-state");
        top.appendChild(b);
        top.appendChild(el("span", r.phase ? String(r.phase).replace(/_/g, " ") : "-", "region-phase"));
        top.appendChild(el("span", r.step || "", "region-step"));
        li.appendChild(top);
        li.appendChild(weightsBar(r.weights));
        if (r.reason) li.appendChild(el("span", r.reason, "reason"));
        list.appendChild(li);
      }
      if (!list.firstChild) list.appendChild(el("li", "No regions in this wave.", "empty"));
      group.appendChild(list);
      return group;
    });
    if (!groups.length) groups.push(el("p", "No waves.", "empty"));
    replaceChildren($("waves"), groups);
  }

  function duration(seconds) {
    const s = Math.max(0, Math.round(seconds));
    if (s < 120) return s + " s";
    if (s < 7200) return Math.round(s / 60) + " min";
    return (s / 3600).toFixed(1) + " h";
  }

  // -- notifications ----------------------------------------------------------------------------

  const NOTIFY_COLUMNS = ["queued", "sent", "failed", "dropped", "retries", "pending"];

  function renderNotifications(notifications) {
    const card = $("notifications-card");
    const names = notifications && typeof notifications === "object" ? Object.keys(notifications).sort() : [];
    card.hidden = !names.length;
    const rows = [];
    for (const name of names) {
      const n = notifications[name] || {};
      const tr = el("tr");
      tr.dataset.webhook = name;
      tr.appendChild(el("td", name, "webhook"));
      for (const key of NOTIFY_COLUMNS) {
        const value = n[key];
        const text = typeof value === "boolean" ? (value ? "yes" : "no") : num(value) === null ? "-" : fmt(value, 6);
        const td = el("td", text, "num " + key);
        if ((key === "failed" || key === "dropped") && num(value) > 0) td.classList.add("bad");
        tr.appendChild(td);
      }
      rows.push(tr);
      if (n.last_error) {
        const errorRow = el("tr", null, "last-error");
        const td = el("td", "last error: " + n.last_error, "reason");
        td.colSpan = NOTIFY_COLUMNS.length + 1;
        errorRow.appendChild(td);
        rows.push(errorRow);
      }
    }
    replaceChildren($("notifications").tBodies[0], rows);
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

  function confirmCommand(command, label) {
    const dialog = $("confirm");
    $("confirm-text").textContent = CONFIRM_TEXT[command];
    $("confirm-ok").textContent = label;
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

  async function command(name, label) {
    if (commandInFlight !== null || !(await confirmCommand(name, label))) return;
    const result = $("command-result");
    result.hidden = false;
    result.className = "result";
    result.textContent = name + "…";
    commandInFlight = name;
    for (const button of document.querySelectorAll("[data-command]")) button.disabled = true;
    try {
      const body = await call("POST", API + "/" + name, (reason, pauseMs) => {
        result.textContent = name + ": " + reason + "; sending it again in " + pauseMs / 1000 + " s…";
      });
      result.textContent = name + ": done" + (body && body.phase ? " (phase " + body.phase + ")" : "");
      result.classList.add("ok");
    } catch (e) {
      if (e instanceof Refused) {
        refused(e.message);
        return;
      }
      result.textContent = name + " refused: " + e.message;
      result.classList.add("bad");
    } finally {
      commandInFlight = null;  // the next poll draws the buttons again
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
      button.addEventListener("click", () => command(button.dataset.command, button.textContent));
    }
    setInterval(updateLive, 1000);
    if (token()) {
      startPolling();
    } else {
      showLogin("");
    }
  });
})();
