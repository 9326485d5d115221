// DeepOpt live updates: one websocket to /ws/events/ per page, reconnecting by itself, and the updaters
// that keep the pages current without a reload. Every page works without this file.
//
// For page scripts:  window.DeepOptLive.on(type, fn)   fn(data, message) for each event of that type
//                    ("*" for all); returns a function that removes the listener.
//                    DeepOptLive.subscribeJob(id) / unsubscribeJob(id), DeepOptLive.send(object),
//                    DeepOptLive.connected, DeepOptLive.refresh(names?) (re-fetch [data-live-region]s).
// The document gets `deepopt:connected` and `deepopt:disconnected` events.
(function () {
  "use strict";

  var BACKOFF_MIN_MS = 500;
  var BACKOFF_MAX_MS = 15000;
  var LOG_LINES_KEPT = 1000;
  var CLOSE_UNAUTHENTICATED = 4401;
  // How the progress card names a runner's numbers (others: their key, underscores as spaces).
  var METRIC_LABELS = { step_s: "step time (s)", samples_per_s: "samples / s", lr: "learning rate",
                        compute_s: "compute (s)", exposed_comm_s: "exposed communication (s)" };

  var listeners = {};
  var socket = null;
  var attempts = 0;
  var connected = false;
  var everConnected = false;
  var stopped = false;
  var retryTimer = null;
  var jobs = {};

  function on(type, fn) {
    (listeners[type] = listeners[type] || []).push(fn);
    return function off() {
      listeners[type] = (listeners[type] || []).filter(function (f) { return f !== fn; });
    };
  }

  function emit(message) {
    var fns = (listeners[message.type] || []).concat(listeners["*"] || []);
    fns.forEach(function (fn) {
      try { fn(message.data || {}, message); } catch (error) { console.error("DeepOptLive listener", error); }
    });
  }

  function send(object) {
    if (socket && socket.readyState === WebSocket.OPEN) { socket.send(JSON.stringify(object)); return true; }
    return false;
  }

  function subscribeJob(id) { jobs[id] = true; send({ subscribe: "job", id: id }); }
  function unsubscribeJob(id) { delete jobs[id]; send({ unsubscribe: "job", id: id }); }

  function indicator(state, text) {
    var el = document.getElementById("live-status");
    if (!el) return;
    el.setAttribute("data-state", state);
    el.textContent = text;
  }

  function setConnected(value) {
    if (connected === value) return;
    connected = value;
    document.dispatchEvent(new CustomEvent(value ? "deepopt:connected" : "deepopt:disconnected"));
  }

  function url() {
    return (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws/events/";
  }

  function connect() {
    retryTimer = null;
    if (stopped) return;
    try {
      socket = new WebSocket(url());
    } catch (error) {
      scheduleReconnect();
      return;
    }
    socket.onmessage = function (event) {
      var message;
      try { message = JSON.parse(event.data); } catch (error) { return; }
      if (message.type === "hello") {
        var missedEvents = everConnected;
        attempts = 0;
        everConnected = true;
        Object.keys(jobs).forEach(function (id) { send({ subscribe: "job", id: Number(id) }); });
        indicator("live", "live");
        setConnected(true);
        // Events sent while the socket was down are lost: bring what they would have changed up to date.
        if (missedEvents) refresh();
      }
      if (message.type === "membership") {
        // The user's teams changed: the server moved this socket to its new groups; what the page shows
        // was drawn for the old ones, so redraw it (and forget jobs the user may no longer follow).
        var kept = {};
        (message.data && message.data.jobs || []).forEach(function (id) { if (jobs[id]) kept[id] = true; });
        jobs = kept;
        refresh();
      }
      emit(message);
    };
    socket.onclose = function (event) {
      socket = null;
      setConnected(false);
      if (event.code === CLOSE_UNAUTHENTICATED) {
        stopped = true;
        indicator("offline", "signed out");
        return;
      }
      scheduleReconnect();
    };
  }

  function scheduleReconnect() {
    if (stopped || retryTimer) return;
    // Exponential backoff with jitter: after a server restart, a thousand pages do not come back at once.
    var delay = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * Math.pow(2, attempts));
    delay = delay / 2 + Math.random() * delay / 2;
    attempts += 1;
    indicator("reconnecting", "reconnecting…");
    retryTimer = setTimeout(connect, delay);
  }

  function reconnectNow() {
    if (stopped || connected) return;
    if (retryTimer) { clearTimeout(retryTimer); retryTimer = null; }
    attempts = 0;
    if (!socket) connect();
  }

  // Re-render parts of the page from the server: the page's own HTML, fetched again, region by region.
  var refreshTimer = null;
  var refreshNames = null;
  function refresh(names) {
    refreshNames = names && refreshNames !== "all" ? (refreshNames || []).concat(names) : "all";
    if (refreshTimer) return;
    refreshTimer = setTimeout(function () {
      var wanted = refreshNames;
      refreshTimer = null;
      refreshNames = null;
      fetch(location.href, { credentials: "same-origin", headers: { "X-Requested-With": "fetch" } })
        .then(function (response) { return response.ok ? response.text() : null; })
        .then(function (html) {
          if (!html) return;
          var fresh = new DOMParser().parseFromString(html, "text/html");
          document.querySelectorAll("[data-live-region]").forEach(function (old) {
            var name = old.getAttribute("data-live-region");
            if (wanted !== "all" && wanted.indexOf(name) < 0) return;
            var replacement = fresh.querySelector('[data-live-region="' + name + '"]');
            if (replacement) old.replaceWith(document.importNode(replacement, true));
          });
          document.dispatchEvent(new CustomEvent("deepopt:refreshed", { detail: { regions: wanted } }));
        })
        .catch(function () { /* the next event or reconnect tries again */ });
    }, 250);
  }

  window.DeepOptLive = {
    on: on,
    send: send,
    subscribeJob: subscribeJob,
    unsubscribeJob: unsubscribeJob,
    refresh: refresh,
    get connected() { return connected; },
  };

  // ---- helpers for the updaters ----

  function esc(value) {
    return String(value == null ? "" : value).replace(/[&<>"']/g, function (c) {
      return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c];
    });
  }
  function badge(state) {
    return '<span class="badge badge-' + esc(state) + '">' + esc(String(state || "").replace(/_/g, " ")) + "</span>";
  }
  function flash(el) {
    el.classList.remove("live-flash");
    void el.offsetWidth; // restart the animation
    el.classList.add("live-flash");
  }
  function all(selector, root) { return Array.prototype.slice.call((root || document).querySelectorAll(selector)); }
  var TERMINAL = ["succeeded", "failed", "cancelled"];
  var KINDS = { compression: "Compression", training: "Training", selftest: "Self-test" };

  function formatEta(iso, tz) {
    if (!iso) return '<span class="muted">unknown</span>';
    var when = new Date(iso);
    var hhmm;
    try {
      hhmm = new Intl.DateTimeFormat("en-GB", { hour: "2-digit", minute: "2-digit", timeZone: tz || undefined }).format(when);
    } catch (error) {
      hhmm = when.toISOString().slice(11, 16);
    }
    var minutes = Math.round((when - Date.now()) / 60000);
    var relative = minutes <= 0 ? "now" : minutes < 60 ? "in " + minutes + " min" : "in " + Math.round(minutes / 60) + " h";
    return esc(hhmm) + ' <span class="muted">(' + relative + ")</span>";
  }

  // ---- job rows (job list, dashboard, team page) ----

  function jobRow(data, hideTeam) {
    var kind = KINDS[data.kind] || data.kind;
    return '<tr data-job-row="' + esc(data.id) + '" data-state="' + esc(data.state) + '">' +
      '<td class="num muted opt">' + esc(data.id) + "</td>" +
      '<td class="job-name"><a class="strong" href="/jobs/' + esc(data.id) + '/">' + esc(data.name) + "</a>" +
      '<div class="muted small">' + esc(kind) + (data.model ? " · " + esc(data.model) : "") + "</div></td>" +
      (hideTeam ? "" : '<td class="nowrap">' + esc(data.team_name || "") + "</td>") +
      '<td class="opt"><span class="prio prio-' + esc(data.priority) + '">' + esc(data.priority) + "</span></td>" +
      '<td class="num nowrap opt">' + esc(data.gpus) +
      (data.nodes > 1 ? '<span class="muted small"> on ' + esc(data.nodes) + " nodes</span>" : "") + "</td>" +
      '<td data-field="state">' + badge(data.state) + "</td>" +
      '<td class="nowrap"><time datetime="' + esc(data.submitted_at) + '">just now</time>' +
      (data.submitter ? '<div class="muted small">by ' + esc(data.submitter) + "</div>" : "") + "</td></tr>";
  }

  on("job.state", function (data) {
    all('[data-job-row="' + data.id + '"]').forEach(function (row) {
      row.setAttribute("data-state", data.state);
      var cell = row.querySelector('[data-field="state"]');
      if (cell) cell.innerHTML = badge(data.state);
      flash(row);
    });
    if (data.from_state !== "" || data.state !== "queued") return;
    all("table[data-live-jobs][data-live-insert]").forEach(function (table) {
      var team = table.getAttribute("data-team");
      if (team && Number(team) !== data.team) return;
      if (table.querySelector('[data-job-row="' + data.id + '"]')) return;
      var body = table.tBodies[0];
      all("tr.empty-row", body).forEach(function (row) { row.remove(); });
      body.insertAdjacentHTML("afterbegin", jobRow(data, table.hasAttribute("data-hide-team")));
      flash(body.rows[0]);
      var max = Number(table.getAttribute("data-live-max")) || 10;
      while (body.rows.length > max) body.deleteRow(body.rows.length - 1);
    });
  });

  // ---- the queue ----

  function queueTable() { return document.querySelector("table[data-live-queue]"); }

  function sortQueue(body) {
    var rows = all("tr[data-queue-row]", body);
    rows.sort(function (a, b) {
      var pa = Number(a.querySelector('[data-field="position"]').textContent) || Infinity;
      var pb = Number(b.querySelector('[data-field="position"]').textContent) || Infinity;
      return pa - pb;
    });
    rows.forEach(function (row) { body.appendChild(row); });
  }

  function emptyQueue(body) {
    if (!body.querySelector("tr[data-queue-row]") && !body.querySelector("tr.empty-row")) {
      body.insertAdjacentHTML("beforeend", '<tr class="empty-row"><td colspan="8" class="empty">Nothing is waiting.</td></tr>');
    }
  }

  on("job.state", function (data) {
    var table = queueTable();
    if (!table) return;
    var body = table.tBodies[0];
    var row = body.querySelector('[data-queue-row="' + data.id + '"]');
    if (data.state !== "queued") {
      if (row) row.remove();
      emptyQueue(body);
      return;
    }
    if (row || !table.hasAttribute("data-live-insert")) return;
    all("tr.empty-row", body).forEach(function (r) { r.remove(); });
    body.insertAdjacentHTML("beforeend",
      '<tr data-queue-row="' + esc(data.id) + '" data-team="' + esc(data.team) + '">' +
      '<td data-field="position">—</td>' +
      '<td><a href="/jobs/' + esc(data.id) + '/">' + esc(data.name) + '</a><div class="muted small">#' + esc(data.id) +
      (data.team_name ? " · " + esc(data.team_name) : "") + "</div></td>" +
      '<td><code class="muted">next pass</code></td>' +
      '<td class="num">' + esc(data.gpus) + (data.nodes > 1 ? ' <span class="muted">on ' + esc(data.nodes) + "</span>" : "") + "</td>" +
      '<td><span class="prio prio-' + esc(data.priority) + '">' + esc(data.priority) + "</span></td>" +
      '<td class="num muted">—</td>' +
      '<td data-field="reason">' + esc(data.pending_reason) + "</td>" +
      '<td data-field="eta"><span class="muted">unknown</span></td></tr>');
    flash(body.lastElementChild);
  });

  on("queue.changed", function (data) {
    if (data.scope !== "team") return;
    var table = queueTable();
    if (table) {
      var body = table.tBodies[0];
      var tz = table.getAttribute("data-tz");
      var listed = {};
      data.entries.forEach(function (entry) {
        listed[entry.job] = true;
        var row = body.querySelector('[data-queue-row="' + entry.job + '"]');
        if (!row) return;
        var position = row.querySelector('[data-field="position"]');
        var reason = row.querySelector('[data-field="reason"]');
        var changed = position.textContent !== String(entry.position) || reason.textContent !== entry.reason;
        position.textContent = entry.position;
        reason.textContent = entry.reason;
        row.querySelector('[data-field="eta"]').innerHTML = formatEta(entry.eta, tz);
        if (changed) flash(row);
      });
      if (!data.truncated) {
        all('tr[data-queue-row][data-team="' + data.team + '"]', body).forEach(function (row) {
          if (!listed[row.getAttribute("data-queue-row")]) row.remove();
        });
      }
      sortQueue(body);
      emptyQueue(body);
    }
    var head = document.querySelector("[data-live-job]");
    if (head) {
      var id = Number(head.getAttribute("data-live-job"));
      var mine = data.entries.filter(function (e) { return e.job === id; })[0];
      var info = document.querySelector('[data-testid="queue-info"]');
      if (mine && info) {
        info.querySelector('[data-field="position"]').textContent = "#" + mine.position + " in the queue.";
        info.querySelector('[data-field="reason"]').textContent = mine.reason;
      } else if (mine && head.getAttribute("data-state") === "queued") {
        refresh(["job-status"]);
      }
    }
  });

  // ---- job detail: state, progress, log ----

  function setUpJobPage() {
    var head = document.querySelector("[data-live-job]");
    if (!head) return;
    var id = Number(head.getAttribute("data-live-job"));
    jobs[id] = true;
    function scrollLog() {
      var log = document.querySelector("[data-live-log]");
      if (log) log.scrollTop = log.scrollHeight;
    }
    scrollLog();
    // The progress card is redrawn by the catch-up below: its log starts at the bottom again.
    document.addEventListener("deepopt:refreshed", function (event) {
      var regions = event.detail && event.detail.regions;
      if (regions === "all" || (regions && regions.indexOf("job-progress") >= 0)) scrollLog();
    });

    function applyState(data) {
      head.setAttribute("data-state", data.state);
      all('[data-testid="job-state"]').forEach(function (el) { el.innerHTML = badge(data.state); flash(el); });
      if (TERMINAL.indexOf(data.state) >= 0 || data.state === "cancelling") {
        all("form[data-live-cancel]").forEach(function (form) { form.remove(); });
      }
      if (data.state !== "queued") {  // only a queued job can be held or released
        all("form[data-live-hold]").forEach(function (form) { form.remove(); });
        // "… is in the queue." from the submission is no longer true.
        all('.alert[data-notice~="while-queued"]').forEach(function (notice) { notice.remove(); });
      }
      refresh(["job-status", "job-overview", "job-allocations", "job-result", "job-report", "job-events"]);
    }

    on("job.state", function (data) {
      if (data.id === id) applyState(data);
    });
    // The answer to the page's subscription says where the job stands: a job that moved between the
    // page's rendering and its socket's connecting (one that starts at once) is brought up to date.
    on("subscribed", function (data) {
      if (data.job === id && data.state && data.state !== head.getAttribute("data-state")) {
        applyState(data);
        refresh(["job-progress"]);  // and the progress lines sent before the socket was there
      }
    });

    on("job.progress", function (data) {
      if (data.job !== id) return;
      var card = document.querySelector("[data-live-progress]");
      var log = card && card.querySelector("[data-live-log]");
      if (!card) return;
      card.hidden = false;
      if (data.percent != null) {
        var bar = card.querySelector('[data-field="progress-bar"]');
        bar.style.width = Math.max(0, Math.min(100, data.percent)) + "%";
        bar.parentNode.setAttribute("aria-valuenow", data.percent);
        var parts = [];
        if (data.stage) parts.push(data.stage);
        if (data.steps) parts.push("step " + data.step + " of " + data.steps);
        parts.push((Math.round(data.percent * 10) / 10) + " %");
        card.querySelector('[data-field="progress-text"]').textContent = parts.join(" · ");
      }
      var metrics = card.querySelector('[data-field="metrics"]');
      if (metrics && data.metrics && Object.keys(data.metrics).length) {
        metrics.innerHTML = Object.keys(data.metrics).map(function (key) {
          var value = data.metrics[key];
          return "<dt>" + esc(METRIC_LABELS[key] || key.replace(/_/g, " ")) + "</dt><dd>" + esc(typeof value === "number" ? Number(value.toPrecision(6)) : value) + "</dd>";
        }).join("");
      }
      if (log && data.lines && data.lines.length) {
        var atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 30;
        var prefix = data.attempt > 1 ? "[attempt " + data.attempt + "] " : "";
        log.appendChild(document.createTextNode(data.lines.map(function (l) { return prefix + l + "\n"; }).join("")));
        var text = log.textContent.split("\n");
        if (text.length > LOG_LINES_KEPT + 1) log.textContent = text.slice(text.length - LOG_LINES_KEPT - 1).join("\n");
        if (atBottom) log.scrollTop = log.scrollHeight;
      }
    });
  }

  // ---- nodes: state, busy GPUs, telemetry ----

  function setBusy(strip, busy) {
    if (!strip) return;
    var set = {};
    busy.forEach(function (i) { set[i] = true; });
    all(".gpu-cell", strip).forEach(function (cell) {
      cell.classList.toggle("busy", !!set[cell.getAttribute("data-gpu")]);
    });
  }

  on("node.state", function (data) {
    var known = false;
    all('[data-node-row="' + data.id + '"]').forEach(function (row) {
      known = true;
      var state = row.querySelector('[data-field="state"]');
      if (state) state.innerHTML = badge(data.state);
      setBusy(row.querySelector("[data-gpu-strip]"), data.busy);
      var count = row.querySelector('[data-field="busy"]');
      if (count) count.textContent = data.busy.length + " / " + data.gpus;
      flash(row);
    });
    if (!known && document.querySelector("table[data-live-nodes]")) refresh(["nodes"]);
    var page = document.querySelector('[data-live-node="' + data.id + '"]');
    if (page) {
      all('[data-field="state"]').forEach(function (el) { el.innerHTML = badge(data.state); });
      setBusy(document.querySelector("[data-gpu-strip]"), data.busy);
      var busyText = document.querySelector('[data-field="busy"]');
      if (busyText) busyText.textContent = data.busy.length + " of " + data.gpus;
      refresh(["node-actions", "node-gpus"]);
    }
    updateDashboardGpus(data);
  });

  function fmtGb(mb) { return mb == null ? '<span class="muted">—</span>' : esc(Math.round(mb / 1024)) + " GB"; }
  function fmtUnit(value, unit) { return value == null ? '<span class="muted">—</span>' : esc(Math.round(value)) + " " + unit; }

  on("node.telemetry", function (data) {
    var rows = all('[data-node-row="' + data.node + '"]');
    var page = document.querySelector('[data-live-node="' + data.node + '"]');
    if (!rows.length && !page) return;
    var strips = rows.map(function (row) { return row.querySelector("[data-gpu-strip]"); });
    if (page) strips.push(document.querySelector("[data-gpu-strip]"));
    data.gpus.forEach(function (gpu) {
      strips.forEach(function (strip) {
        var cell = strip && strip.querySelector('[data-gpu="' + gpu.index + '"]');
        if (!cell || gpu.utilization == null) return;
        cell.style.setProperty("--util", Math.round(gpu.utilization) + "%");
        cell.title = "GPU " + gpu.index + ": " + Math.round(gpu.utilization) + " %" +
          (gpu.memory_used_mb != null ? ", " + Math.round(gpu.memory_used_mb / 1024) + " GB used" : "");
      });
      var row = page && document.querySelector('[data-gpu-row="' + gpu.index + '"]');
      if (row) {
        row.querySelector('[data-field="utilization"]').innerHTML = fmtUnit(gpu.utilization, "%");
        row.querySelector('[data-field="memory_used_mb"]').innerHTML = fmtGb(gpu.memory_used_mb);
        row.querySelector('[data-field="temperature_c"]').innerHTML = fmtUnit(gpu.temperature_c, "°C");
        row.querySelector('[data-field="power_w"]').innerHTML = fmtUnit(gpu.power_w, "W");
      }
    });
    var stamp = '<time datetime="' + esc(data.ts) + '">just now</time>';
    rows.forEach(function (row) {
      var cell = row.querySelector('[data-field="heartbeat"]');
      if (cell) cell.innerHTML = stamp;
    });
    if (page) {
      var beat = document.querySelector('dd[data-field="heartbeat"]');
      if (beat) beat.innerHTML = stamp;
    }
  });

  // ---- team usage against quota, and the dashboard's numbers ----

  function setMeter(wrapper, used, decimals) {
    if (!wrapper) return;
    var meter = wrapper.querySelector(".meter");
    var value = wrapper.querySelector(".meter-value strong");
    if (!meter || !value) return;
    var limit = Number(meter.getAttribute("aria-valuemax")) || 0;
    var percent = limit <= 0 ? (used > 0 ? 100 : 0) : Math.min(100, Math.round(100 * used / limit));
    value.textContent = decimals ? String(Math.round(used * 10) / 10) : String(used);
    meter.setAttribute("aria-valuenow", used);
    meter.className = "meter meter-" + (percent >= 90 ? "danger" : percent >= 70 ? "warn" : "ok");
    meter.querySelector("span").style.width = percent + "%";
  }

  // `usage` may be partial (a new job's event carries only queued_jobs): what it lacks stays as it is.
  function updateUsage(team, usage) {
    all('[data-usage-team="' + team + '"]').forEach(function (box) {
      ["running_jobs", "queued_jobs"].forEach(function (key) {
        if (usage[key] == null) return;
        all('[data-usage="' + key + '"]', box).forEach(function (el) { el.textContent = usage[key]; });
      });
      if (usage.gpus_in_use != null) setMeter(box.querySelector('[data-usage-meter="gpus_in_use"]'), usage.gpus_in_use, false);
      if (usage.gpu_hours_this_month != null) {
        setMeter(box.querySelector('[data-usage-meter="gpu_hours_this_month"]'), usage.gpu_hours_this_month, true);
      }
    });
    var queued = document.querySelector('[data-stat="queued"]');
    if (queued) {
      var total = 0;
      all('.usage[data-usage-team] [data-usage="queued_jobs"]').forEach(function (el) { total += Number(el.textContent) || 0; });
      queued.textContent = total;
    }
  }

  on("*", function (data) {
    if (data && data.usage && data.team != null) updateUsage(data.team, data.usage);
  });

  var nodeGpus = null;
  function updateDashboardGpus(node) {
    var stats = document.querySelector("[data-node-gpus]");
    if (!stats) return;
    if (!nodeGpus) {
      try { nodeGpus = JSON.parse(stats.getAttribute("data-node-gpus")); } catch (error) { nodeGpus = {}; }
    }
    nodeGpus[node.id] = [node.busy.length, node.gpus, node.state];
    var used = 0, total = 0, free = 0, count = 0, byState = {};
    Object.keys(nodeGpus).forEach(function (key) {
      var n = nodeGpus[key];
      count += 1; used += n[0]; total += n[1];
      byState[n[2]] = (byState[n[2]] || 0) + 1;
      if (n[2] === "active") free += n[1] - n[0];
    });
    // The feet under the numbers: nodes by state, and free GPUs on nodes that take no jobs.
    all("[data-node-state-count]", stats).forEach(function (el) {
      var n = byState[el.getAttribute("data-node-state-count")] || 0;
      el.hidden = !n;
      var value = el.querySelector("[data-count]");
      if (value) value.textContent = n;
    });
    var unavailable = document.querySelector("[data-stat-unavailable]");
    if (unavailable) {
      unavailable.hidden = !(total - used - free);
      unavailable.querySelector("[data-count]").textContent = total - used - free;
    }
    var usedEl = document.querySelector('[data-stat="gpus-used"]');
    if (usedEl) {
      usedEl.innerHTML = esc(used) + "<small> / " + esc(total) + "</small>";
      var meter = usedEl.parentNode.querySelector(".meter");
      var percent = total ? Math.min(100, Math.round(100 * used / total)) : 0;
      if (meter) {
        meter.className = "meter meter-" + (percent >= 90 ? "danger" : percent >= 70 ? "warn" : "ok");
        meter.querySelector("span").style.width = percent + "%";
      }
    }
    var freeEl = document.querySelector('[data-stat="gpus-free"]');
    if (freeEl) freeEl.textContent = free;
    var nodesEl = document.querySelector('[data-stat="nodes"]');
    if (nodesEl) nodesEl.textContent = count;
  }
  document.addEventListener("deepopt:refreshed", function () { nodeGpus = null; });

  // ---- start ----

  document.addEventListener("DOMContentLoaded", function () {
    if (!document.getElementById("live-status") || !("WebSocket" in window)) return;
    setUpJobPage();
    window.addEventListener("online", reconnectNow);
    document.addEventListener("visibilitychange", function () { if (!document.hidden) reconnectNow(); });
    connect();
  });
})();
