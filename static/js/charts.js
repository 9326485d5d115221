// Load charts (observed + forecast with its 80% band + active capacity), the compression layer chart and a
// training job's loss chart.
// Data comes embedded in the page (json_script); a `forecast.updated` event from live.js makes the
// chart fetch its series again from the REST API (same shape) and redraw in place.
(function () {
  "use strict";

  var COLORS = { observed: "#2563eb", forecast: "#d97706", band: "rgba(217,119,6,0.18)", capacity: "#6b7280",
                 scaleUp: "#dc2626", scaleDown: "#059669" };
  var LAYOUT = {
    margin: { l: 48, r: 12, t: 8, b: 36 },
    showlegend: true,
    legend: { orientation: "h", y: -0.18 },
    xaxis: { type: "date" },
    yaxis: { rangemode: "tozero" },
    hovermode: "x unified",
    paper_bgcolor: "rgba(0,0,0,0)",
    plot_bgcolor: "rgba(0,0,0,0)",
  };

  function traces(chart) {
    var out = [];
    var f = chart.forecast;
    if (f && f.t.length) {
      // The band first so the lines draw over it: upper, then lower filled up to it.
      out.push({ x: f.t, y: f.upper, mode: "lines", line: { width: 0 }, hoverinfo: "skip", showlegend: false, name: "upper" });
      out.push({ x: f.t, y: f.lower, mode: "lines", line: { width: 0 }, fill: "tonexty", fillcolor: COLORS.band, name: "80% band", hoverinfo: "skip" });
      out.push({ x: f.t, y: f.yhat, mode: "lines", line: { color: COLORS.forecast, dash: "dash", width: 2 }, name: "forecast" });
    }
    // A series a few minutes old has one or two points: markers, or plotly draws nothing.
    out.push({ x: chart.history.t, y: chart.history.y, mode: chart.history.t.length < 3 ? "lines+markers" : "lines",
               line: { color: COLORS.observed, width: 2 }, name: "observed" });
    if (chart.capacity != null) {  // only the allocated-GPUs chart has one; 0 when every node is on standby
      var xs = chart.history.t.concat(f ? f.t : []);
      if (xs.length) {
        var ends = [xs[0], xs[xs.length - 1]];
        out.push({ x: ends, y: [chart.capacity, chart.capacity], mode: "lines",
                   line: { color: COLORS.capacity, dash: "dot", width: 1 }, name: "active GPUs" });
        // The autoscaler's lines (while it is on): a forecast above the first brings standby nodes back,
        // one that stays below the second drains a node. They move with the capacity.
        var a = chart.autoscaler;
        if (a) {
          [["scale-up line", a.scale_up_at, COLORS.scaleUp], ["scale-down line", a.scale_down_below, COLORS.scaleDown]]
            .forEach(function (line) {
              var y = Math.round(line[1] * chart.capacity * 100) / 100;
              out.push({ x: ends, y: [y, y], mode: "lines", line: { color: line[2], dash: "dashdot", width: 1 },
                         name: line[0] + " (" + Math.round(100 * line[1]) + " %)", hovertemplate: "%{y}<extra>" + line[0] + "</extra>" });
            });
        }
      }
    }
    return out;
  }

  // "How it did": the forecaster's own scores of the targets that came in over the last days.
  function record(chart) {
    var r = chart.forecast && chart.forecast.track_record;
    var labels = r ? Object.keys(r) : [];
    if (!labels.length) return "";
    var minutes = function (label) {  // "10min", "1h", "6h": the database does not keep the keys' order
      var m = /^(\d+)(min|h|D)$/.exec(label);
      return m ? Number(m[1]) * { min: 1, h: 60, D: 1440 }[m[2]] : Infinity;
    };
    labels.sort(function (a, b) { return minutes(a) - minutes(b); });
    return "How it did since " + r[labels[0]].since.slice(0, 10) + ": " + labels.map(function (h) {
      var x = r[h];
      var ratio = x.ratio_to_persistence == null ? "" : " (" + x.ratio_to_persistence.toFixed(2) + "× persistence)";
      return h + " ahead MAE " + x.mae.toFixed(1) + ratio + ", band held " + Math.round(100 * x.coverage) + " % of " +
        x.scored + " targets";
    }).join(" · ");
  }

  function meta(chart) {
    var f = chart.forecast;
    if (!f) return "no forecast yet: it needs an hour of data";
    return "forecast from " + f.origin.slice(0, 16).replace("T", " ") + " UTC · " + f.method + " · " + f.compute_s + " s";
  }

  // Always the last and the next 24 hours, so that charts side by side line up (and a series with a
  // single point still gets a time axis).
  function layoutFor(chart) {
    var now = Date.now();
    var hour = 3600 * 1000;
    return Object.assign({}, LAYOUT, { xaxis: { type: "date", range: [new Date(now - 24 * hour).toISOString(),
                                                                        new Date(now + 24 * hour).toISOString()] } });
  }

  function draw(el, chart) {
    var plot = el.querySelector("[data-chart-plot]");
    window.Plotly.react(plot, traces(chart), layoutFor(chart), { displaylogo: false, responsive: true });
    var label = el.querySelector("[data-chart-meta]");
    if (label) label.textContent = meta(chart);
    var scores = el.querySelector("[data-chart-record]");
    if (scores) scores.textContent = record(chart);
    el.setAttribute("data-forecast-origin", chart.forecast ? chart.forecast.origin : "");
    if (chart.capacity != null) el.setAttribute("data-capacity", String(chart.capacity));
  }

  // The API's series detail -> the embedded shape (one place that knows both).
  function fromApi(series, capacity, autoscaler) {
    var h = series.history || [];
    var f = series.forecast;
    return {
      id: series.id, key: series.key, label: series.label, metric: series.metric, capacity: capacity, autoscaler: autoscaler,
      history: { t: h.map(function (p) { return p.ts; }), y: h.map(function (p) { return p.value; }) },
      forecast: f ? {
        origin: f.origin, method: f.method, compute_s: f.compute_s, refitted: f.refitted, track_record: f.track_record,
        t: f.points.map(function (p) { return p.ts; }), yhat: f.points.map(function (p) { return p.yhat; }),
        lower: f.points.map(function (p) { return p.lower; }), upper: f.points.map(function (p) { return p.upper; }),
      } : null,
    };
  }

  function setUpLoadChart(el) {
    var data = JSON.parse(el.querySelector('script[type="application/json"]').textContent);
    draw(el, data);
    if (window.DeepOptLive) {
      window.DeepOptLive.on("forecast.updated", function (event) {
        if (!event || event.series !== data.key) return;
        fetch("/api/v1/forecasts/" + data.id + "/?hours=24", { credentials: "same-origin", headers: { Accept: "application/json" } })
          .then(function (r) { return r.ok ? r.json() : Promise.reject(r.status); })
          .then(function (series) { data = fromApi(series, data.capacity, data.autoscaler); draw(el, data); })
          .catch(function () { /* the next forecast brings another try */ });
      });
      // A node activated, put on standby or down: the dotted capacity line moves with it.
      window.DeepOptLive.on("cluster.capacity", function (event) {
        if (data.capacity == null || !event || typeof event.active_gpus !== "number" || event.active_gpus === data.capacity) return;
        data.capacity = event.active_gpus;
        draw(el, data);
      });
    }
  }

  function setUpLayerChart(el) {
    var source = document.getElementById("compression-layers");
    if (!source) return;
    var layers = JSON.parse(source.textContent);
    var formats = {};
    layers.forEach(function (l) { Object.keys(l.sensitivity_by_format || {}).forEach(function (f) { formats[f] = true; }); });
    var names = layers.map(function (l) { return l.name; });
    var out = Object.keys(formats).sort().map(function (fmt) {
      return {
        type: "bar", name: fmt, x: names,
        y: layers.map(function (l) { return (l.sensitivity_by_format || {})[fmt]; }),
        marker: { line: { width: layers.map(function (l) { return l.format === fmt ? 2 : 0; }), color: "#111827" } },
        hovertemplate: "%{x}<br>" + fmt + ": drop %{y:.4f}<extra></extra>",
      };
    });
    var chosen = { x: names, y: layers.map(function () { return 0; }), mode: "text", type: "scatter", name: "chosen",
                   text: layers.map(function (l) { return l.format; }), textposition: "top center", showlegend: false, hoverinfo: "skip" };
    out.push(chosen);
    var layout = Object.assign({}, LAYOUT, { barmode: "group", xaxis: { type: "category", tickangle: -30 },
      yaxis: { title: { text: "quality drop" } }, hovermode: "closest" });
    window.Plotly.react(el, out, layout, { displaylogo: false, responsive: true });
  }

  // A training job's loss by step (apps/dashboard/live_context.training_curve). While the job runs
  // ("log"), each progress event of rank 0 that carries a step and a loss adds a point.
  function setUpLossChart(el) {
    var source = el.parentNode.querySelector('script[type="application/json"]');
    if (!source) return;
    var curve = JSON.parse(source.textContent);
    var xs = curve.points.map(function (p) { return p[0]; });
    var ys = curve.points.map(function (p) { return p[1]; });
    var out = [{ x: xs, y: ys, mode: xs.length < 3 ? "lines+markers" : "lines", name: "training loss",
                 line: { color: COLORS.observed, width: 2 } }];
    if (curve.eval_loss != null && xs.length) {
      out.push({ x: [xs[xs.length - 1]], y: [curve.eval_loss], mode: "markers", name: "held-out loss",
                 marker: { color: COLORS.forecast, size: 9 } });
    }
    // A loss that falls by orders of magnitude reads on a log axis.
    var positive = ys.length && ys.every(function (y) { return y > 0; });
    var spread = positive ? Math.max.apply(null, ys) / Math.min.apply(null, ys) : 1;
    var layout = Object.assign({}, LAYOUT, {
      xaxis: { title: { text: "step" }, range: curve.steps ? [0, curve.steps] : undefined },
      yaxis: spread > 30 ? { title: { text: "loss (log)" }, type: "log" } : { title: { text: "loss" }, rangemode: "tozero" },
      hovermode: "closest",
    });
    window.Plotly.react(el, out, layout, { displaylogo: false, responsive: true });
    el.setAttribute("data-points", String(xs.length));
    if (curve.source !== "log" || !window.DeepOptLive) return;
    window.DeepOptLive.on("job.progress", function (data) {
      // A region refresh replaces the chart: the old one stops listening.
      if (!data || data.job !== curve.job || !document.body.contains(el)) return;
      if (data.rank) return;
      var loss = data.metrics && data.metrics.loss;
      if (typeof data.step !== "number" || typeof loss !== "number") return;
      window.Plotly.extendTraces(el, { x: [[data.step]], y: [[loss]] }, [0]);
      el.setAttribute("data-points", String(el.data[0].x.length));
    });
  }

  // A new scaling decision goes on top of the decisions table, newest first.
  function setUpDecisions(tbody) {
    if (!window.DeepOptLive) return;
    window.DeepOptLive.on("scaling.decision", function (d) {
      var empty = tbody.querySelector(".empty-row");
      if (empty) empty.remove();
      var row = document.createElement("tr");
      var cells = [d.at.slice(0, 16).replace("T", " "), d.action === "activate" ? "Bring back from standby" : "Drain to standby",
                   d.node, d.forecast_peak.toFixed(1), String(d.active_capacity), d.reason];
      cells.forEach(function (text, i) {
        var td = document.createElement("td");
        td.textContent = text;
        if (i === 3 || i === 4) td.className = "num";
        row.appendChild(td);
      });
      tbody.insertBefore(row, tbody.firstChild);
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-decisions]").forEach(setUpDecisions);
    if (!window.Plotly) return;
    document.querySelectorAll(".load-chart").forEach(setUpLoadChart);
    document.querySelectorAll("[data-layer-chart]").forEach(setUpLayerChart);
    document.querySelectorAll("[data-loss-chart]").forEach(setUpLossChart);
  });
  // A job that finishes while its page is open: live.js swaps the report region in; draw its chart.
  document.addEventListener("deepopt:refreshed", function () {
    if (!window.Plotly) return;
    document.querySelectorAll("[data-layer-chart]:not(.js-plotly-plot)").forEach(setUpLayerChart);
    document.querySelectorAll("[data-loss-chart]:not(.js-plotly-plot)").forEach(setUpLossChart);
  });
})();
