// fanout dashboard. Polls /dashboard/data once a refresh (the admin token, when one is
// needed, goes in the Authorization header from this tab's sessionStorage, never in a
// URL) and redraws. Everything shown is put into the page as text nodes, never as HTML:
// mirror bodies and headers come from upstreams and must not run.
"use strict";
(() => {
  const TOKEN = "fanout.admin.token";
  const THEME = "fanout.theme";
  const WINDOW_MS = 5 * 60 * 1000; // what the rings keep
  const MIN_WINDOW_MS = 60 * 1000; // a young process's charts span at least a minute
  const SVG = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);
  let refreshMs = 1000;
  let timer = null;
  let generation = 0; // bumped on log-in and log-out: stale polls are ignored
  let renders = 0;
  // The series the page has seen, by route and by mirror; each poll asks only for what
  // came after `newest` and appends it.
  let kept = new Map();
  let newest = 0;

  class Refused extends Error {}

  // --- building the page ---------------------------------------------------------------

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    setAttrs(e, attrs);
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      e.append(c instanceof Node ? c : String(c));
    }
    return e;
  }

  function svg(tag, attrs) {
    const e = document.createElementNS(SVG, tag);
    setAttrs(e, attrs);
    return e;
  }

  function setAttrs(e, attrs) {
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "onclick") e.addEventListener("click", v);
      else e.setAttribute(k, v === true ? "" : String(v));
    }
  }

  function fill(node, ...children) {
    node.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  }

  const fmt = {
    rate(x) {
      if (x === null || x === undefined) return "–";
      return x >= 100 ? x.toFixed(0) : x >= 10 ? x.toFixed(1) : x.toFixed(2);
    },
    ms(x) {
      if (x === null || x === undefined) return "–";
      return x >= 1000 ? (x / 1000).toFixed(2) + " s" : x >= 10 ? x.toFixed(0) + " ms" : x.toFixed(1) + " ms";
    },
    pct(x) {
      if (x === null || x === undefined) return "–";
      return (x * 100).toFixed(x >= 0.1 ? 0 : 1) + " %";
    },
    bytes(n) {
      if (n === null || n === undefined) return "–";
      const units = ["B", "KiB", "MiB", "GiB", "TiB"];
      let i = 0;
      while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
      return (i ? n.toFixed(1) : String(n)) + " " + units[i];
    },
    age(s) {
      if (s === null || s === undefined) return "–";
      if (s < 60) return s + " s";
      if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
      return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
    },
    int(n) { return n === null || n === undefined ? "–" : Number(n).toLocaleString("en"); },
    // A chart's span: "5 min", "90 s".
    span(ms) {
      const s = Math.round(ms / 1000);
      return s >= 120 ? Math.round(s / 60) + " min" : s + " s";
    },
  };

  const last = (a) => (a && a.length ? a[a.length - 1] : null);

  // --- talking to the gateway ------------------------------------------------------------

  async function api(path) {
    const headers = {};
    const token = sessionStorage.getItem(TOKEN);
    if (token) headers.Authorization = "Bearer " + token;
    const r = await fetch(path, { headers, cache: "no-store", credentials: "omit" });
    if (r.status === 401) throw new Refused("token refused");
    if (!r.ok) throw new Error(path.split("?")[0] + " answered " + r.status);
    return r.json();
  }

  function needsToken() {
    return document.body.dataset.auth === "token";
  }

  function showLogin(message) {
    clearTimeout(timer);
    generation++;
    $("board").hidden = true;
    $("logout").hidden = true;
    $("login").hidden = false;
    const err = $("login-error");
    err.textContent = message || "";
    err.hidden = !message;
    $("live").textContent = "";
    $("token").focus();
  }

  function showBoard() {
    $("login").hidden = true;
    $("board").hidden = false;
    $("logout").hidden = !needsToken();
  }

  async function poll(mine) {
    try {
      const data = await api("/dashboard/data?since=" + newest);
      if (mine !== generation) return;
      merge(data);
      showBoard();
      render(data);
      $("live").textContent = "updated " + new Date().toLocaleTimeString();
      $("live").className = "muted";
    } catch (e) {
      if (mine !== generation) return;
      if (e instanceof Refused) {
        sessionStorage.removeItem(TOKEN);
        showLogin("The token was refused.");
        return;
      }
      $("live").textContent = "cannot reach the gateway (" + e.message + "), retrying";
      $("live").className = "bad";
    }
    if (mine === generation) timer = setTimeout(() => poll(mine), refreshMs);
  }

  function start() {
    clearTimeout(timer);
    generation++;
    kept = new Map();
    newest = 0;
    poll(generation);
  }

  // Appends each series' new points to what the page has, drops what is older than the
  // rings keep, and puts the whole series back where the renderers look for it.
  function merge(d) {
    const seen = new Map();
    const join = (key, fresh) => {
      const have = kept.get(key);
      const series = {};
      for (const [k, v] of Object.entries(fresh)) {
        series[k] = Array.isArray(v) && have && Array.isArray(have[k]) ? have[k].concat(v) : v;
      }
      const t = series.t || [];
      const from = t.findIndex((x) => x >= (last(t) || 0) - WINDOW_MS);
      if (from > 0) {
        for (const [k, v] of Object.entries(series)) if (Array.isArray(v) && v.length === t.length) series[k] = v.slice(from);
      }
      seen.set(key, series);
      newest = Math.max(newest, last(series.t) || 0);
      return series;
    };
    for (const r of d.routes || []) if (r.series) r.series = join("route\u0000" + r.route, r.series);
    for (const m of d.mirrors || []) {
      const s = join("mirror\u0000" + m.route + "\u0000" + m.upstream, { t: m.t, match: m.match, differ: m.differ, incomplete: m.incomplete });
      Object.assign(m, s);
    }
    kept = seen;
  }

  // --- the sections ----------------------------------------------------------------------

  function render(d) {
    refreshMs = d.refresh_ms || 1000;
    $("where").textContent = "v" + d.version + " · up " + fmt.age(d.uptime_seconds);
    renderOverview(d);
    renderRoutes(d.routes || []);
    renderUpstreams(d.upstreams || []);
    renderBroadcast(d.routes || []);
    renderMirrors(d.mirrors || []);
    document.body.dataset.renders = String(++renders);
  }

  function card(label, value, sub, attrs) {
    return el("div", Object.assign({ class: "card" }, attrs || {}),
      el("div", { class: "label" }, label),
      el("div", { class: "value" }, value),
      sub ? el("div", { class: "sub" }, sub) : null);
  }

  function renderOverview(d) {
    const t = d.totals || {};
    const c = d.config || {};
    const lr = c.last_reload;
    const cards = [
      card("Requests", fmt.int(t.requests), fmt.int(t.responses) + " answered"),
      card("Errors", fmt.int(t.errors), t.requests ? fmt.pct(t.errors / t.requests) + " of requests" : null,
        { class: t.errors ? "card bad" : "card" }),
      card("Configuration", "generation " + c.generation, (c.hash || "").slice(0, 12) + " · since " + (c.since || ""),
        { id: "generation" }),
      card("Last reload",
        lr ? lr.result : "none",
        lr ? [lr.at, (lr.errors || lr.needs_upgrade || []).join("; ")].filter(Boolean).join(" · ") : "since the start",
        { id: "last-reload", class: lr && lr.result !== "ok" ? "card warn" : "card" }),
    ];
    if (d.cache) {
      cards.push(card("Cache", fmt.pct(d.cache.hit_ratio) + " hits",
        fmt.int(d.cache.entries) + " entries · " + fmt.bytes(d.cache.bytes) + " of " + fmt.bytes(d.cache.max_size),
        { id: "cache" }));
    }
    fill($("overview"), cards);
  }

  // A small chart of `lines` ([{values, class}]) over the last minutes, sharing one
  // vertical scale from zero. `null` values leave gaps.
  // The time a chart spans: what the ring holds, between one and five minutes.
  function span(times, now) {
    return Math.min(WINDOW_MS, Math.max(MIN_WINDOW_MS, times.length ? now - times[0] : 0));
  }

  function chart(times, lines, attrs) {
    const w = 200, h = 38, pad = 2;
    const now = Date.now();
    const spanMs = span(times, now);
    const max = Math.max(1e-9, ...lines.flatMap((l) => l.values.filter((v) => v !== null)));
    const s = svg("svg", Object.assign({ class: "chart", viewBox: `0 0 ${w} ${h}`, preserveAspectRatio: "none", role: "img" }, attrs));
    frame(s, w, h, pad);
    for (const line of lines) {
      let points = [];
      const flush = () => {
        if (points.length) s.append(svg("polyline", { class: line.class, points: points.join(" ") }));
        points = [];
      };
      times.forEach((t, i) => {
        const v = line.values[i];
        if (v === null || v === undefined) { flush(); return; }
        const x = Math.max(0, w - ((now - t) / spanMs) * w);
        const y = h - pad - (v / max) * (h - 2 * pad);
        points.push(x.toFixed(1) + "," + y.toFixed(1));
      });
      flush();
    }
    const title = svg("title");
    title.textContent = lines.map((l) => l.name + ": " + l.show(last(l.values))).join(" · ") + " (max " + lines[0].show(max) + ")";
    s.append(title);
    const unit = lines[0].unit ? " " + lines[0].unit : "";
    return plot(s, lines[0].show(max === 1e-9 ? 0 : max) + unit, spanMs);
  }

  // The axes of a chart drawn `w` by `h`: time along the bottom, the scale up the left
  // side, and a dashed line at the top of the scale.
  function frame(s, w, h, pad) {
    s.append(svg("line", { class: "axis", x1: 0, y1: h - 0.5, x2: w, y2: h - 0.5 }));
    s.append(svg("line", { class: "axis", x1: 0.5, y1: 0, x2: 0.5, y2: h }));
    s.append(svg("line", { class: "grid", x1: 0, y1: pad, x2: w, y2: pad }));
  }

  // A chart with its labels: the top of its scale, with its unit, at the upper left (the
  // bottom is zero), and the time it spans under it, ending now.
  function plot(s, top, spanMs) {
    return el("figure", { class: "plot" + (s.classList.contains("wide") ? " wide" : "") },
      el("span", { class: "y", "data-axis": "y" }, top),
      s,
      el("span", { class: "x", "data-axis": "x" },
        el("span", null, "−" + fmt.span(spanMs)), el("span", null, "now")));
  }

  function target(r) {
    if (r.upstream) return r.upstream + (r.fallback ? " → " + r.fallback.join(", ") : "");
    if (r.broadcast) return r.broadcast.map((b) => (typeof b === "string" ? b : b.upstream)).join(", ");
    if (r.redirect) return r.redirect.status + " " + r.redirect.to;
    return "";
  }

  function renderRoutes(routes) {
    const rows = routes.map((r) => {
      const s = r.series || { t: [], rps: [], errors: [], p50_ms: [], p99_ms: [] };
      const rps = last(s.rps), errs = last(s.errors);
      return el("tr", { "data-route": r.route },
        el("td", null, el("code", null, r.route), r.host ? el("span", { class: "muted" }, " " + r.host) : null,
          r.auth ? el("span", { class: "tag" }, " " + r.auth) : null),
        el("td", null, r.kind),
        el("td", null, target(r)),
        el("td", { class: "num", "data-value": "rps" }, fmt.rate(rps)),
        el("td", { class: "num" + (errs ? " bad" : "") }, rps ? fmt.pct((errs || 0) / rps) : "–"),
        el("td", { class: "num" }, fmt.ms(last(s.p50_ms))),
        el("td", { class: "num" }, fmt.ms(last(s.p99_ms))),
        el("td", null, chart(s.t, [
          { values: s.rps, class: "rps", name: "req/s", show: fmt.rate, unit: "req/s" },
          { values: s.errors, class: "err", name: "5xx/s", show: fmt.rate },
        ], { "data-route": r.route, "data-series": "traffic", "data-points": s.t.length, "data-last": rps === null ? "" : rps })),
        el("td", null, chart(s.t, [
          { values: s.p99_ms, class: "p99", name: "p99", show: fmt.ms },
          { values: s.p50_ms, class: "p50", name: "p50", show: fmt.ms },
        ], { "data-route": r.route, "data-series": "latency", "data-points": s.t.length })));
    });
    fill($("routes").tBodies[0], rows);
  }

  function renderUpstreams(upstreams) {
    fill($("upstreams"), upstreams.map((u) => {
      const down = u.backends.filter((b) => !b.healthy || b.circuit !== "closed").length;
      const c = u.concurrency;
      return el("div", { class: "panel upstream", "data-upstream": u.name },
        el("h3", null, u.name, " ", el("span", { class: "tag" }, u.balance),
          " ", el("span", { class: down ? "bad" : "good" },
            (u.backends.length - down) + "/" + u.backends.length + " available")),
        c ? el("p", { class: "muted", "data-concurrency": c.limit },
          "concurrency limit " + c.limit + " · in flight " + c.inflight + " · waiting " + c.waiting +
          (c.min_rtt_ms ? " · min RTT " + fmt.ms(c.min_rtt_ms) : "") + (c.measuring ? " · measuring" : "")) : null,
        el("div", { class: "scroll" }, el("table", null,
          el("thead", null, el("tr", null, el("th", null, "Backend"), el("th", null, "Source"),
            el("th", { class: "num" }, "Weight"), el("th", null, "Health"), el("th", null, "Circuit"),
            el("th", { class: "num" }, "In flight"), el("th", { class: "num" }, "2xx / 4xx / 5xx"),
            el("th", null, "Errors"), el("th", null, "Last check"), el("th", null, "Action"))),
          el("tbody", null, u.backends.map((b) => {
            const open = b.circuit !== "closed";
            const cls = !b.healthy ? "down" : open ? (b.circuit === "half_open" ? "half" : "down") : "";
            const marked = b.state && b.state !== "active";
            return el("tr", { class: (marked ? "half" : cls) || null, "data-backend": b.address, "data-name": b.name || null, "data-state": b.state, "data-healthy": String(b.healthy), "data-circuit": b.circuit },
              el("td", { class: "addr" }, el("span", { class: "dot" }), b.name ? el("strong", null, b.name + " ") : null, el("code", null, b.address)),
              el("td", null, b.source),
              el("td", { class: "num" }, b.weight),
              el("td", { "data-since": b.health_since || "" }, (b.healthy ? "healthy" : "unhealthy") +
                inState(b.health_since) + (marked ? " · " + b.state : "")),
              el("td", null, b.circuit),
              el("td", { class: "num" }, b.inflight),
              el("td", { class: "num", "data-responses": "" },
                b.responses ? b.responses["2xx"] + " / " + b.responses["4xx"] + " / " + b.responses["5xx"] : ""),
              el("td", { "data-errors": "" }, errorsByKind(b.errors)),
              el("td", { "data-check": b.last_check ? String(b.last_check.ok) : "none" },
                b.last_check
                  ? (b.last_check.ok ? "ok" : b.last_check.reason) + " · " + fmt.ms(b.last_check.latency_ms)
                  : "—"),
              el("td", { class: "actions" }, actions(u.name, b)));
          })))));
    }));
  }

  // " for 3 min 5 s": how long a backend has been as it is, if it changed since the start.
  function inState(since) {
    if (!since) return "";
    const s = Math.max(0, Math.round((Date.now() - Date.parse(since)) / 1000));
    return Number.isFinite(s) ? " for " + fmt.age(s) : "";
  }

  const ERROR_KINDS = { connect: "refused", connect_timeout: "connect timeout", timeout: "timeout", broken: "broken" };

  // "refused 3 · timeout 1": attempts without an answer, by kind; "0" when none.
  function errorsByKind(errors) {
    if (!errors) return "";
    const seen = Object.entries(ERROR_KINDS).filter(([k]) => errors[k] > 0);
    if (!seen.length) return "0";
    return seen.map(([k, name]) => name + " " + fmt.int(errors[k])).join(" · ");
  }

  // The admin actions a backend's state allows, as buttons.
  function actions(upstream, b) {
    const can = b.state === "active" ? ["drain", "disable"] : b.state === "draining" ? ["enable", "disable"] : ["enable"];
    return can.map((a) => el("button", {
      type: "button", "data-action": a, title: a + " " + b.address,
      onclick: () => act(upstream, b.address, a),
    }, a));
  }

  async function act(upstream, backend, action) {
    const headers = {};
    const token = sessionStorage.getItem(TOKEN);
    if (token) headers.Authorization = "Bearer " + token;
    const path = "/upstreams/" + encodeURIComponent(upstream) + "/backends/" + backend + "/" + action;
    try {
      const r = await fetch(path, { method: "POST", headers, cache: "no-store", credentials: "omit" });
      if (r.status === 401) {
        sessionStorage.removeItem(TOKEN);
        showLogin("The token was refused.");
        return;
      }
      const body = await r.json().catch(() => ({}));
      if (!r.ok) throw new Error(body.error || "answered " + r.status);
      $("live").textContent = backend + ": " + body.state;
      $("live").className = "muted";
    } catch (e) {
      $("live").textContent = action + " " + backend + " failed: " + e.message;
      $("live").className = "bad";
    }
  }

  function renderBroadcast(routes) {
    const rows = [];
    for (const r of routes) {
      for (const t of r.targets || []) {
        rows.push(el("tr", { "data-route": r.route, "data-target": t.upstream },
          el("td", null, el("code", null, r.route)),
          el("td", null, t.upstream),
          el("td", { class: "num" + (t.pending ? " warn" : "") }, fmt.int(t.pending)),
          el("td", { class: "num" }, fmt.bytes(t.pending_bytes)),
          el("td", { class: "num" }, fmt.age(t.oldest_seconds)),
          el("td", { class: t.last_error ? "bad" : "muted" }, t.last_error || "–")));
      }
    }
    $("broadcast-section").hidden = rows.length === 0;
    fill($("broadcast").tBodies[0], rows);
  }

  function bars(m) {
    const w = 300, h = 56;
    const now = Date.now();
    const max = Math.max(1e-9, ...m.t.map((_, i) => m.match[i] + m.differ[i]));
    const s = svg("svg", { class: "chart wide", viewBox: `0 0 ${w} ${h}`, preserveAspectRatio: "none", "data-points": m.t.length });
    frame(s, w, h, 2);
    const spanMs = span(m.t, now);
    const bw = w / (spanMs / refreshMs);
    m.t.forEach((t, i) => {
      const x = w - ((now - t) / spanMs) * w - bw;
      if (x < -bw) return;
      const hm = (m.match[i] / max) * (h - 2), hd = (m.differ[i] / max) * (h - 2);
      if (hm > 0) s.append(svg("rect", { class: "match", x: x.toFixed(1), y: (h - hm).toFixed(1), width: bw.toFixed(2), height: hm.toFixed(1) }));
      if (hd > 0) s.append(svg("rect", { class: "differ", x: x.toFixed(1), y: (h - hm - hd).toFixed(1), width: bw.toFixed(2), height: hd.toFixed(1) }));
    });
    const top = max === 1e-9 ? 0 : max;
    return plot(s, fmt.int(Math.round(top)) + " pairs per " + fmt.span(refreshMs), spanMs);
  }

  function renderMirrors(mirrors) {
    $("mirrors-section").hidden = mirrors.length === 0;
    fill($("mirrors"), mirrors.map((m) => {
      const t = m.totals;
      const compared = t.match + t.differ;
      return el("div", { class: "panel mirror", "data-route": m.route, "data-upstream": m.upstream },
        el("h3", null, el("code", null, m.route), " mirrored to ", m.upstream),
        el("p", null,
          el("span", { class: "good", "data-count": "match" }, fmt.int(t.match) + " match"), " · ",
          el("span", { class: t.differ ? "bad" : "muted", "data-count": "differ" }, fmt.int(t.differ) + " differ"), " · ",
          el("span", { class: "muted" }, fmt.int(t.incomplete) + " incomplete"),
          compared ? el("span", { class: "muted" }, " · " + fmt.pct(t.match / compared) + " alike") : null),
        bars(m),
        el("p", { class: "legend muted" }, el("span", { class: "key match" }), "match/s", el("span", { class: "key differ" }), "differ/s"),
        m.diffs.length
          ? el("ul", { class: "diffs" }, m.diffs.map((d) => el("li", null,
            el("button", { type: "button", "data-request-id": d.request_id, onclick: () => openPair(m, d) },
              el("span", { class: "muted" }, d.time.replace("T", " ").replace(/\.\d+Z$/, "Z")),
              el("code", null, d.method + " " + d.path),
              el("span", { class: "tag" }, d.result),
              el("span", null, d.primary_status + " vs " + d.mirror_status)))))
          : el("p", { class: "muted" }, "No differing pair kept (up to " + m.keep + " are)."));
    }));
  }

  // --- one differing pair, side by side ---------------------------------------------------

  async function openPair(m, d) {
    const dialog = $("pair");
    $("pair-title").textContent = d.method + " " + d.path;
    fill($("pair-body"), el("p", { class: "muted" }, "Loading…"));
    if (!dialog.open) dialog.showModal();
    const q = "route=" + encodeURIComponent(m.route) + "&upstream=" + encodeURIComponent(m.upstream) +
      "&request_id=" + encodeURIComponent(d.request_id);
    try {
      renderPair(await api("/dashboard/diff?" + q));
    } catch (e) {
      if (e instanceof Refused) { dialog.close(); showLogin("The token was refused."); return; }
      fill($("pair-body"), el("p", { class: "bad" }, "This pair is no longer kept: " + e.message));
    }
  }

  function renderPair(p) {
    const statusDiffers = p.primary.status !== p.mirror.status;
    const headers = el("table", { id: "pair-headers" },
      el("thead", null, el("tr", null, el("th", null, "Header"), el("th", null, "Primary"), el("th", null, "Mirror (" + p.upstream + ")"))),
      el("tbody", null,
        el("tr", { class: statusDiffers ? "differs" : null, "data-header": ":status" },
          el("td", null, el("code", null, "status")), el("td", { class: "value" }, p.primary.status), el("td", { class: "value" }, p.mirror.status)),
        p.headers.map((h) => el("tr", {
          class: h.differs ? "differs" : h.ignored ? "ignored" : null,
          "data-header": h.name, "data-differs": String(h.differs),
        },
        el("td", null, el("code", null, h.name), h.ignored ? el("span", { class: "tag" }, " ignored") : null),
        el("td", { class: "value" }, h.primary === null ? el("span", { class: "muted" }, "(absent)") : h.primary),
        el("td", { class: "value" }, h.mirror === null ? el("span", { class: "muted" }, "(absent)") : h.mirror)))));
    const bodies = compareBodies(p);
    fill($("pair-body"),
      el("p", { class: "muted" }, "request " + p.request_id + " · " + p.time + " · route " + p.route + " · differs in ",
        el("strong", null, p.result)),
      el("h3", null, "Status and headers"),
      el("div", { class: "scroll" }, headers),
      el("h3", { style: null }, "Bodies"),
      el("p", { class: "muted", id: "pair-summary" }, bodies.summary),
      el("div", { class: "sides" },
        el("div", null, el("h3", null, "Primary · " + fmt.bytes(p.primary.length)), bodies.primary),
        el("div", null, el("h3", null, "Mirror · " + fmt.bytes(p.mirror.length)), bodies.mirror)));
  }

  function parsed(side) {
    if (side.json !== null && side.json !== undefined) return { ok: true, value: side.json };
    if (!side.complete) return { ok: false };
    try { return { ok: true, value: JSON.parse(side.body) }; } catch (_) { return { ok: false }; }
  }

  function compareBodies(p) {
    const a = parsed(p.primary), b = parsed(p.mirror);
    if (a.ok && b.ok && (typeof a.value === "object" || typeof b.value === "object")) {
      return compareJson(a.value, b.value, (p.ignore_json_fields || []).map((f) => f.split(".")));
    }
    return compareText(p.primary, p.mirror);
  }

  // Every path of a JSON value → its leaf as text (containers: their kind).
  function flatten(v, path, out) {
    if (v !== null && typeof v === "object") {
      out.set(path.join("\u0000"), Array.isArray(v) ? "[array]" : "{object}");
      for (const [k, c] of Object.entries(v)) flatten(c, path.concat(String(k)), out);
    } else {
      out.set(path.join("\u0000"), JSON.stringify(v));
    }
    return out;
  }

  function ignoredBy(patterns, path) {
    return patterns.some((pat) => pat.length <= path.length && pat.every((s, i) => s === "*" || s === path[i]));
  }

  // Pretty-printed JSON as lines, each knowing the path of the value it shows.
  function jsonLines(v, path, indent, prefix, comma, out) {
    const pad = "  ".repeat(indent);
    if (v !== null && typeof v === "object") {
      const entries = Array.isArray(v) ? v.map((c, i) => [String(i), c]) : Object.entries(v);
      const [open, close] = Array.isArray(v) ? ["[", "]"] : ["{", "}"];
      if (!entries.length) { out.push({ text: pad + prefix + open + close + comma, path }); return out; }
      out.push({ text: pad + prefix + open, path, container: true });
      entries.forEach(([k, c], i) => jsonLines(c, path.concat(k), indent + 1,
        Array.isArray(v) ? "" : JSON.stringify(k) + ": ", i < entries.length - 1 ? "," : "", out));
      out.push({ text: pad + close + comma, path, container: true });
      return out;
    }
    out.push({ text: pad + prefix + JSON.stringify(v) + comma, path });
    return out;
  }

  function compareJson(a, b, ignored) {
    const fa = flatten(a, [], new Map()), fb = flatten(b, [], new Map());
    const differing = new Set();
    for (const k of new Set([...fa.keys(), ...fb.keys()])) {
      if (fa.get(k) !== fb.get(k) && !ignoredBy(ignored, k ? k.split("\u0000") : [])) differing.add(k);
    }
    const leaves = [...differing].filter((k) => {
      const va = fa.get(k), vb = fb.get(k);
      return !(va === "{object}" || va === "[array]") || !(vb === "{object}" || vb === "[array]");
    });
    const side = (v) => el("pre", { class: "body json" }, jsonLines(v, [], 0, "", "", []).map((l) => {
      const key = l.path.join("\u0000");
      const ign = l.path.length && ignoredBy(ignored, l.path);
      const diff = differing.has(key) && !(l.container && (fa.get(key) === fb.get(key)));
      return el("span", {
        class: "line" + (diff ? " differs" : ign ? " ignored" : ""),
        "data-path": l.path.join("."),
      }, l.text);
    }));
    const names = leaves.map((k) => k.split("\u0000").join(".") || "(the whole body)");
    return {
      summary: leaves.length
        ? leaves.length + (leaves.length === 1 ? " field differs: " : " fields differ: ") + names.slice(0, 12).join(", ") + (names.length > 12 ? ", …" : "") +
          (ignored.length ? " (ignored: " + ignored.map((p) => p.join(".")).join(", ") + ")" : "")
        : "The JSON bodies are alike field by field" + (ignored.length ? " once the ignored fields are left out" : "") + ".",
      primary: side(a),
      mirror: side(b),
    };
  }

  function compareText(a, b) {
    const x = a.body, y = b.body;
    let pre = 0;
    while (pre < x.length && pre < y.length && x[pre] === y[pre]) pre++;
    let suf = 0;
    while (suf < x.length - pre && suf < y.length - pre && x[x.length - 1 - suf] === y[y.length - 1 - suf]) suf++;
    const side = (s, full) => el("pre", { class: "body text" },
      s.slice(0, pre), el("mark", null, s.slice(pre, s.length - suf)), s.slice(s.length - suf),
      full.complete ? null : el("span", { class: "muted" }, "\n… first " + fmt.bytes(new TextEncoder().encode(s).length) + " of " + fmt.bytes(full.length)));
    const same = x === y;
    return {
      summary: same
        ? "The kept beginnings are alike; the bodies differ further on (lengths " + a.length + " and " + b.length + ", hashes " + a.hash + " and " + b.hash + ")."
        : "The bodies first differ at character " + pre + ".",
      primary: side(x, a),
      mirror: side(y, b),
    };
  }

  // --- theme, log-in, start ---------------------------------------------------------------

  function applyTheme(t) {
    if (t) document.documentElement.dataset.theme = t;
    else delete document.documentElement.dataset.theme;
    const dark = t ? t === "dark" : matchMedia("(prefers-color-scheme: dark)").matches;
    $("theme").textContent = dark ? "Light" : "Dark";
  }

  document.addEventListener("DOMContentLoaded", () => {
    applyTheme(localStorage.getItem(THEME));
    $("theme").addEventListener("click", () => {
      const dark = $("theme").textContent === "Dark";
      localStorage.setItem(THEME, dark ? "dark" : "light");
      applyTheme(dark ? "dark" : "light");
    });
    $("login-form").addEventListener("submit", (e) => {
      e.preventDefault();
      sessionStorage.setItem(TOKEN, $("token").value.trim());
      $("token").value = "";
      $("login-error").hidden = true;
      start();
    });
    $("logout").addEventListener("click", () => {
      sessionStorage.removeItem(TOKEN);
      showLogin("");
    });
    $("pair-close").addEventListener("click", () => $("pair").close());
    if (needsToken() && !sessionStorage.getItem(TOKEN)) showLogin("");
    else start();
  });
})();
