// The recsys dashboard's behaviour: sortable/filterable fleet table, Chart.js charts from the
// page's JSON (tenant trends, experiment arms), and the confirmed actions (rollback / pin / unpin). No inline handlers: the
// pages carry data attributes and one JSON block, this file does the rest.
"use strict";

(function () {
  const base = document.body.dataset.base || "";
  const css = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  const STAGE_COLOURS = ["#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#eeca3b",
                         "#b279a2", "#ff9da6", "#9d755d", "#bab0ac", "#1f77b4"];

  // ---- fleet table: click a header to sort, type or pick a health to filter ----
  function sortTable(table, col, th) {
    const body = table.tBodies[0];
    const numeric = th.dataset.type === "num";
    const dir = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
    table.querySelectorAll("th").forEach((h) => h.removeAttribute("aria-sort"));
    th.setAttribute("aria-sort", dir === 1 ? "ascending" : "descending");
    const key = (row) => {
      const cell = row.cells[col];
      const raw = cell.dataset.sort !== undefined ? cell.dataset.sort : cell.textContent.trim();
      return numeric ? parseFloat(raw) : raw.toLowerCase();
    };
    const rows = Array.from(body.rows);
    rows.sort((a, b) => (key(a) > key(b) ? dir : key(a) < key(b) ? -dir : 0));
    rows.forEach((r) => body.appendChild(r));
  }

  function setupFleet() {
    const table = document.getElementById("fleet");
    if (!table) return;
    table.querySelectorAll("th.sortable").forEach((th, i) => th.addEventListener("click", () => sortTable(table, i, th)));
    const text = document.getElementById("filter");
    const health = document.getElementById("health-filter");
    const apply = () => {
      const q = text.value.trim().toLowerCase();
      Array.from(table.tBodies[0].rows).forEach((row) => {
        const okText = !q || row.textContent.toLowerCase().includes(q);
        const okHealth = !health.value || row.dataset.health === health.value;
        row.hidden = !(okText && okHealth);
      });
    };
    text.addEventListener("input", apply);
    health.addEventListener("change", apply);
  }

  // ---- tenant page charts ----
  function chart(canvas, config) {
    if (!canvas || typeof Chart === "undefined") return null;
    Chart.defaults.color = css("--muted") || "#718096";
    Chart.defaults.borderColor = css("--border") || "#e2e8f0";
    Chart.defaults.animation = false; // the journey test screenshots a settled page
    config.options = Object.assign({ responsive: true, maintainAspectRatio: false }, config.options || {});
    return new Chart(canvas, config);
  }

  function setupTenant() {
    const node = document.getElementById("page-data");
    if (!node) return;
    const data = JSON.parse(node.textContent);
    const labels = data.releases.map((r) => (r.data_interval_end || r.release_id).slice(0, 10));
    document.querySelectorAll("canvas[data-metric]").forEach((canvas) => {
      const m = canvas.dataset.metric;
      const val = (v) => (v === undefined || v === null ? null : v);
      chart(canvas, {
        type: "line",
        data: {
          labels,
          datasets: [
            { label: "model", data: data.releases.map((r) => val(r.metrics[m])), borderColor: "#0063c7",
              backgroundColor: "#0063c7", spanGaps: true },
            { label: "popularity", data: data.releases.map((r) => val((r.popularity || {})[m])), borderColor: "#a0aec0",
              backgroundColor: "#a0aec0", borderDash: [4, 4], spanGaps: true },
          ],
        },
        options: { plugins: { tooltip: { callbacks: { title: (items) => data.releases[items[0].dataIndex].release_id } } } },
      });
    });

    const runs = data.runs || [];
    const runLabels = runs.map((r) => r.interval_end.slice(0, 10));
    const colour = (r) => {
      if (!r.validation) return css("--queued");
      if (!r.validation.success) return css("--failed");
      return r.validation.warnings ? css("--warning") : css("--success");
    };
    chart(document.getElementById("volume-chart"), {
      type: "bar",
      data: { labels: runLabels, datasets: [{ label: "events in the interval",
        data: runs.map((r) => r.interval_events), backgroundColor: runs.map(colour) }] },
      options: { plugins: { legend: { display: false }, tooltip: { callbacks: {
        afterLabel: (item) => {
          const v = runs[item.dataIndex].validation;
          return v ? (v.success ? "passed" : "FAILED") + ", " + v.warnings + " warnings" : "not validated";
        } } } } },
    });

    const stages = [];
    runs.forEach((r) => Object.keys(r.cost || {}).forEach((s) => { if (!stages.includes(s)) stages.push(s); }));
    chart(document.getElementById("duration-chart"), {
      type: "bar",
      data: { labels: runLabels, datasets: stages.map((s, i) => ({ label: s,
        data: runs.map((r) => ((r.cost || {})[s] || {}).wall_s ?? null),
        backgroundColor: STAGE_COLOURS[i % STAGE_COLOURS.length] })) },
      options: { scales: { x: { stacked: true }, y: { stacked: true, title: { display: true, text: "wall s" } } } },
    });

    const diff = data.diff;
    if (diff && diff.available) {
      const e = diff.overlap_histogram.edges;
      chart(document.getElementById("overlap-chart"), {
        type: "bar",
        data: { labels: e.slice(0, -1).map((lo, i) => Math.round(lo * 100) + "–" + Math.round(e[i + 1] * 100) + "%"),
          datasets: [{ label: "users by top-" + diff.k + " overlap", data: diff.overlap_histogram.users,
            backgroundColor: "#0063c7" }] },
        options: { plugins: { legend: { display: true } } },
      });
    }
  }

  // ---- experiments page: per metric a line per arm over days, its 95% interval as a band ----
  const ARM_COLOURS = ["#1f6feb", "#cf222e", "#1a7f37", "#8250df", "#bf8700", "#0a7e8c"];
  const pct = (v, digits) => (v === null || v === undefined ? "—" : (100 * v).toFixed(digits) + "%");

  function setupExperiments() {
    const node = document.getElementById("experiment-series");
    if (!node || typeof Chart === "undefined") return; // the tables below the charts stay open
    const all = JSON.parse(node.textContent);
    document.querySelectorAll("canvas[data-experiment]").forEach((canvas) => {
      // series: {arm: [[day, value, low, high], ...]}, oldest first (experiments_view.series)
      const series = all[Number(canvas.dataset.index)][canvas.dataset.metric];
      const arms = Object.keys(series).sort();
      const days = [...new Set(arms.flatMap((a) => series[a].map((p) => p[0])))].sort();
      const column = (arm, i) => {
        const byDay = new Map(series[arm].map((p) => [p[0], p[i]]));
        return days.map((d) => (byDay.has(d) ? byDay.get(d) : null));
      };
      const datasets = arms.flatMap((arm, n) => {
        const c = ARM_COLOURS[n % ARM_COLOURS.length];
        const band = { pointRadius: 0, borderWidth: 0, spanGaps: true, band: true };
        return [
          { ...band, label: arm + " 95% low", data: column(arm, 2), fill: false },
          { ...band, label: arm + " 95% high", data: column(arm, 3), fill: "-1", backgroundColor: c + "26" },
          { label: arm, data: column(arm, 1), borderColor: c, backgroundColor: c, spanGaps: true },
        ];
      });
      canvas.parentElement.hidden = false;
      const made = chart(canvas, {
        type: "line",
        data: { labels: days, datasets },
        options: {
          interaction: { mode: "index", intersect: false },
          scales: { y: { beginAtZero: true, ticks: { callback: (v) => pct(v, 1) } } },
          plugins: {
            legend: { labels: { filter: (item, d) => !d.datasets[item.datasetIndex].band } },
            tooltip: {
              filter: (item) => !item.dataset.band,
              callbacks: {
                label: (item) => {
                  const arm = item.dataset.label;
                  const lo = column(arm, 2)[item.dataIndex], hi = column(arm, 3)[item.dataIndex];
                  return arm + ": " + pct(item.raw, 2) + (lo === null ? "" : " [" + pct(lo, 2) + ", " + pct(hi, 2) + "]");
                },
              },
            },
          },
        },
      });
      const table = canvas.closest(".experiment-chart").querySelector("details.series-table");
      if (made && table) table.open = false; // the numbers stay one click away
    });
  }

  // ---- actions: confirm, optional reason, JSON POST with the action header, reload ----
  async function act(button) {
    const data = JSON.parse(document.getElementById("page-data").textContent);
    if (!window.confirm(button.dataset.confirm)) return;
    const body = {};
    if (button.dataset.release) body.release_id = button.dataset.release;
    if (button.dataset.askReason) body.reason = window.prompt("Reason (recorded with the action):", "") || "";
    const action = button.dataset.action;
    const message = document.getElementById("message");
    const r = await fetch(base + "/api/tenants/" + data.tenant + "/" + action, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-Recsys-Action": action },
      body: JSON.stringify(body),
    });
    const out = await r.json().catch(() => ({}));
    if (!r.ok) {
      message.className = "bad";
      message.textContent = "Failed: " + (out.detail || r.status);
      return;
    }
    message.className = "ok";
    message.textContent = action === "rollback" ? "Live: " + out.release_id : action === "pin" ? "Pinned" : "Unpinned";
    setTimeout(() => window.location.reload(), 500);
  }

  function setupActions() {
    document.querySelectorAll("button[data-action]").forEach((b) => b.addEventListener("click", () => act(b)));
  }

  document.addEventListener("DOMContentLoaded", () => {
    setupFleet();
    setupTenant();
    setupExperiments();
    setupActions();
  });
})();
