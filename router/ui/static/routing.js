// The Routing page: fetches the plugin's JSON endpoints and draws them. No framework, no build step: the page
// must work wherever the provider is installed. Every text from the server goes in with textContent, never as HTML.
"use strict";

const PAGE = new URL(location.pathname.endsWith("/") ? location.pathname : location.pathname + "/", location.origin);
const LIVE_EVERY_MS = 5000;
const PALETTE = ["#017cee", "#f59e0b", "#10b981", "#8b5cf6", "#ef4444", "#14b8a6", "#f472b6", "#84cc16", "#64748b"];
const params = new URLSearchParams(location.search);
const paging = { decisions: null, fallbacks: null };
// Each search bumps this; an answer to an older search that arrives late is dropped, not drawn over a newer one.
let searchGeneration = 0;

class HttpError extends Error {
  constructor(status, text) { super(text); this.status = status; }
}

async function getJson(path, query = {}) {
  const url = new URL("api/" + path, PAGE);
  for (const [key, value] of Object.entries(query)) {
    if (value !== "" && value !== null && value !== undefined) url.searchParams.set(key, value);
  }
  const response = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
  if (!response.ok) {
    let detail = response.statusText;
    try {
      const body = await response.json();
      // FastAPI's validation errors are a list of {loc, msg}; other errors a string.
      detail = Array.isArray(body.detail)
        ? body.detail.map((item) => `${(item.loc || []).join(".")}: ${item.msg}`).join("; ")
        : body.detail || detail;
    } catch (_) { /* not JSON */ }
    throw new HttpError(response.status, detail);
  }
  return response.json();
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function when(iso) {
  if (!iso) return "";
  const moment = new Date(iso);
  return moment.toISOString().replace("T", " ").slice(0, 19) + " UTC";
}

function ago(seconds) {
  if (seconds < 90) return `${Math.round(seconds)} s ago`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min ago`;
  return `${Math.round(seconds / 3600)} h ago`;
}

function fill(section, rows, makeRow) {
  const body = section.querySelector("tbody");
  body.replaceChildren(...rows.map(makeRow));
  section.querySelector(".empty").hidden = rows.length > 0;
}

function filters() {
  return {
    dag_id: document.getElementById("filter-dag").value.trim(),
    task_id: document.getElementById("filter-task").value.trim(),
  };
}

function storyLink(row) {
  const url = new URL(PAGE);
  url.search = new URLSearchParams({
    dag_id: row.dag_id, task_id: row.task_id, run_id: row.run_id, map_index: row.map_index ?? -1,
  }).toString();
  return el("a", { href: url.toString(), title: "This task instance's routing story" }, row.task_id);
}

function mapped(row) {
  return row.map_index !== null && row.map_index >= 0 ? ` [${row.map_index}]` : "";
}

// -- live ----------------------------------------------------------------------------------------------------

async function loadLive() {
  const section = document.getElementById("live");
  let data;
  try {
    data = await getJson("live");
  } catch (err) {
    if (!(err instanceof HttpError) || err.status !== 403) throw err;
    // The rest of the page is about DAGs this user may read; only the live figures need more.
    section.querySelector(".empty").textContent = "Your role may not see the schedulers' live figures.";
    fill(section, [], (row) => row);
    return;
  }
  const rows = [];
  for (const scheduler of data.schedulers) {
    const name = scheduler.hostname ? `${scheduler.scheduler} (${scheduler.hostname})` : scheduler.scheduler;
    for (const executor of scheduler.executors) {
      const limit = executor.pool ? executor.pool.limit : executor.limit;
      const used = executor.pool && executor.pool.in_flight !== null ? executor.pool.in_flight : executor.in_flight;
      const share = limit ? Math.min(1, used / limit) : 0;
      const meter = el("span", { class: "meter" + (share >= 1 ? " full" : "") }, el("span"));
      meter.firstChild.style.width = `${Math.round(share * 100)}%`;
      const capacity = executor.pool
        ? `${used} / ${limit} (shared ${executor.pool.key})`
        : `${executor.in_flight} / ${executor.limit}`;
      rows.push(el("tr", {
        class: "live-row" + (scheduler.stale ? " stale" : ""),
        "data-scheduler": scheduler.scheduler, "data-executor": executor.name,
      },
        el("td", {}, name),
        el("td", {}, executor.name, el("span", { class: "source" }, ` ${executor.class || ""}`),
          executor.available ? null : el("span", { class: "kind-exhausted" }, " not started")),
        el("td", { class: "num in-flight" }, executor.in_flight),
        el("td", { class: "capacity" }, el("span", { class: "bar-cell" }, meter, capacity)),
        el("td", { class: "num waiting" }, executor.waiting),
        el("td", { class: "published", title: when(scheduler.published_at) },
          ago(scheduler.age_s) + (scheduler.stale ? " (stale: is the scheduler running?)" : "")),
      ));
    }
  }
  fill(section, rows, (row) => row);
}

// -- decisions and fallbacks ---------------------------------------------------------------------------------

function decisionRow(row) {
  const figures = row.figures || {};
  // The decisive reason (the last: which rule sent it where) shows; the whole chain opens on demand.
  const all = row.reasons || [];
  const reasons = el("details", { class: "reasons" },
    el("summary", {}, all.length ? all[all.length - 1] : ""),
    el("ul", {}, ...all.slice(0, -1).map((text) => el("li", {}, text))));
  if (figures.memory_basis) reasons.append(el("p", { class: "source" }, `memory: ${figures.memory_basis}`));
  const how = row.how === "overflow" ? `overflow from ${row.overflow_from}` : row.how;
  return el("tr", { class: "decision", "data-dag-id": row.dag_id, "data-task-id": row.task_id },
    el("td", {}, when(row.when)),
    el("td", {}, row.dag_id),
    el("td", {}, storyLink(row), mapped(row)),
    el("td", {}, row.run_id),
    el("td", { class: "num" }, row.try_number),
    el("td", { class: "executor" }, row.executor || ""),
    el("td", { class: "rule" }, row.rule || ""),
    el("td", { class: "how" }, how || ""),
    el("td", { class: "reasons" }, reasons),
  );
}

function fallbackRow(row) {
  return el("tr", { class: "fallback", "data-dag-id": row.dag_id, "data-task-id": row.task_id },
    el("td", {}, when(row.when)),
    el("td", {}, row.dag_id),
    el("td", {}, storyLink(row), mapped(row)),
    el("td", {}, row.run_id),
    el("td", { class: "num" }, row.try_number),
    el("td", { class: `kind kind-${row.kind}` }, row.kind.replace("_", " ")),
    el("td", {}, row.from || ""),
    el("td", {}, row.to || "(none left)"),
    el("td", { class: "reason" }, row.reason || ""),
    el("td", { class: "detail" }, row.detail || ""),
  );
}

async function loadList(name, makeRow, append = false) {
  const generation = searchGeneration;
  const query = { ...filters(), limit: 100, before_id: append ? paging[name] : null };
  const data = await getJson(name, query);
  if (generation !== searchGeneration) return;
  const section = document.getElementById(name);
  const rows = data[name].map(makeRow);
  if (append) section.querySelector("tbody").append(...rows);
  else fill(section, rows, (row) => row);
  paging[name] = data.next_before_id;
  section.querySelector("button.more").hidden = data.next_before_id === null;
}

// -- charts --------------------------------------------------------------------------------------------------

function noData(container, text) {
  container.replaceChildren(el("p", { class: "empty" }, text));
}

function drawRuleHits(data) {
  const figure = document.getElementById("chart-rule-hits");
  const container = figure.querySelector(".chart");
  const legend = figure.querySelector(".legend");
  legend.replaceChildren();
  if (!data.rule_hits.length) return noData(container, "No task was routed in this window.");
  const bucketMs = data.bucket_s * 1000;
  const start = Math.floor(new Date(data.since).getTime() / bucketMs) * bucketMs;
  const count = Math.max(1, Math.ceil((new Date(data.now).getTime() - start) / bucketMs));
  const rules = [...new Set(data.rule_hits.map((hit) => hit.rule))].sort();
  const stacks = Array.from({ length: count }, () => ({}));
  for (const hit of data.rule_hits) {
    const index = Math.min(count - 1, Math.max(0, Math.floor((new Date(hit.bucket).getTime() - start) / bucketMs)));
    stacks[index][hit.rule] = (stacks[index][hit.rule] || 0) + hit.count;
  }
  const top = Math.max(1, ...stacks.map((stack) => Object.values(stack).reduce((a, b) => a + b, 0)));
  const [width, height, left, bottom] = [720, 200, 36, 18];
  const barWidth = (width - left) / count;
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "Rule hits over time" });
  chart.append(svg("text", { x: 0, y: 10 }, String(top)), svg("text", { x: 0, y: height - bottom }, "0"));
  stacks.forEach((stack, index) => {
    let y = height - bottom;
    rules.forEach((rule, ruleIndex) => {
      const hits = stack[rule] || 0;
      if (!hits) return;
      const barHeight = ((height - bottom - 12) * hits) / top;
      y -= barHeight;
      const bar = svg("rect", {
        class: "bar", x: left + index * barWidth + 1, y, width: Math.max(1, barWidth - 2), height: barHeight,
        fill: PALETTE[ruleIndex % PALETTE.length],
      });
      bar.append(svg("title", {}, `${rule}: ${hits} at ${when(new Date(start + index * bucketMs).toISOString())}`));
      chart.append(bar);
    });
  });
  const labels = Math.min(6, count);
  for (let i = 0; i < labels; i++) {
    const index = Math.round((i * (count - 1)) / Math.max(1, labels - 1));
    const label = new Date(start + index * bucketMs).toISOString().slice(data.bucket_s >= 86400 ? 5 : 11, 16);
    chart.append(svg("text", { x: left + index * barWidth, y: height - 4 }, label));
  }
  container.replaceChildren(chart);
  legend.replaceChildren(...rules.map((rule, index) =>
    el("li", {}, Object.assign(el("i"), { style: `background:${PALETTE[index % PALETTE.length]}` }), rule)));
}

function drawFallbackReasons(data) {
  const container = document.querySelector("#chart-fallback-reasons .chart");
  const reasons = data.fallback_reasons;
  if (!reasons.length) return noData(container, "Nothing fell back in this window.");
  const [width, row, labelWidth] = [360, 22, 130];
  const top = Math.max(...reasons.map((item) => item.count));
  const chart = svg("svg", {
    viewBox: `0 0 ${width} ${row * reasons.length + 4}`, role: "img", "aria-label": "Fallbacks by reason",
  });
  reasons.forEach((item, index) => {
    const y = index * row + 2;
    const barWidth = Math.max(2, ((width - labelWidth - 40) * item.count) / top);
    chart.append(
      svg("text", { x: 0, y: y + 14 }, item.reason),
      svg("rect", { class: "bar", x: labelWidth, y, width: barWidth, height: row - 6, fill: PALETTE[1] }),
      svg("text", { x: labelWidth + barWidth + 4, y: y + 14 }, String(item.count)),
    );
  });
  container.replaceChildren(chart);
}

async function loadCharts() {
  const generation = searchGeneration;
  const hours = document.getElementById("filter-hours").value;
  const data = await getJson("charts", { ...filters(), hours });
  if (generation !== searchGeneration) return;
  drawRuleHits(data);
  drawFallbackReasons(data);
}

// -- learned and the task story ------------------------------------------------------------------------------

function mb(value) {
  return value === null || value === undefined ? "" : `${value.toLocaleString("en")} MB`;
}

async function loadLearned() {
  const generation = searchGeneration;
  const data = await getJson("learned", filters());
  if (generation !== searchGeneration) return;
  const note = document.querySelector("#learned .truncated");
  note.hidden = !data.truncated;
  note.textContent = `Showing ${data.tasks.length} of ${data.total_tasks} tasks: search by DAG or task to see the others.`;
  fill(document.getElementById("learned"), data.tasks, (task) =>
    el("tr", { class: "learned", "data-dag-id": task.dag_id, "data-task-id": task.task_id },
      el("td", {}, task.dag_id),
      el("td", {}, task.task_id),
      el("td", { class: "num" }, task.runs),
      el("td", { class: "num" }, mb(task.memory_mb_p95)),
      el("td", { class: "num memory-need" }, mb(task.memory_need_mb)),
      el("td", { class: "source" }, task.memory_source),
      el("td", { class: "num" }, task.duration_s_p95 === null ? "" : `${task.duration_s_p95} s`),
      el("td", {}, task.out_of_memory
        ? `on ${task.out_of_memory.executor} (${mb(task.out_of_memory.memory_size_mb)}), ${when(task.out_of_memory.at)}`
        : ""),
    ));
}

function storyText(event) {
  if (event.kind === "decision") {
    const how = event.how === "overflow" ? ` (overflow from ${event.overflow_from})` : "";
    return `try ${event.try_number}: routed to ${event.executor} by rule '${event.rule}'${how}; ` +
      (event.reasons || []).join("; ");
  }
  if (event.kind === "run_finished") {
    const peak = event.peak_mb ? `, peak ${mb(event.peak_mb)} of ${mb(event.memory_size_mb)}` : "";
    const took = event.duration_ms !== null && event.duration_ms !== undefined ? `, ${event.duration_ms / 1000} s` : "";
    return `try ${event.try_number}: the run on ${event.executor} ended: ${event.outcome}${took}${peak}`;
  }
  const to = event.to ? `runs again on ${event.to}` : "no fallback left";
  return `try ${event.try_number}: ${event.kind.replace("_", " ")} from ${event.from} (${event.reason}` +
    `${event.detail ? ": " + event.detail : ""}); ${to}`;
}

async function loadStory() {
  const section = document.getElementById("task-story");
  if (!params.get("run_id")) return;
  // Airflow's task-instance tab leaves "{MAP_INDEX}" as it is for a task that is not mapped.
  const mapIndex = /^-?\d+$/.test(params.get("map_index") || "") ? Number(params.get("map_index")) : -1;
  const query = {
    dag_id: params.get("dag_id"), task_id: params.get("task_id"), run_id: params.get("run_id"), map_index: mapIndex,
  };
  const data = await getJson("task", query);
  section.hidden = false;
  section.querySelector("h2").textContent =
    `Routing story of ${query.dag_id}.${query.task_id}${query.map_index >= 0 ? ` [${query.map_index}]` : ""}, run ${query.run_id}`;
  const items = data.events.map((event) =>
    el("li", { class: "story-event", "data-kind": event.kind }, el("span", { class: "source" }, when(event.when) + " "),
      storyText(event)));
  section.querySelector("ol").replaceChildren(...(items.length ? items : [el("li", {}, "The router wrote nothing about this task instance.")]));
}

// -- wiring --------------------------------------------------------------------------------------------------

function showError(err) {
  const box = document.getElementById("error");
  box.hidden = false;
  box.replaceChildren();
  if (err instanceof HttpError && err.status === 401) {
    box.append("You are not logged in to Airflow. ", el("a", { href: "/", target: "_top" }, "Log in"),
      ", then come back to this page.");
  } else {
    box.append(`Could not load the routing data: ${err.message}`);
  }
}

function loadFiltered() {
  const generation = (searchGeneration += 1);
  // "searching" until the latest search is drawn: what a reader (or a test) waits for before reading the tables.
  document.body.dataset.searching = "true";
  const settled = () => {
    if (generation === searchGeneration) document.body.dataset.searching = "false";
  };
  return Promise.all([
    loadList("decisions", decisionRow), loadList("fallbacks", fallbackRow), loadCharts(), loadLearned(),
  ]).finally(settled);
}

function debounce(action, ms) {
  let timer = null;
  return () => { clearTimeout(timer); timer = setTimeout(action, ms); };
}

async function main() {
  document.getElementById("filter-dag").value = params.get("dag_id") || "";
  document.getElementById("filter-task").value = params.get("task_id") || "";
  const debounced = debounce(() => loadFiltered().catch(showError), 250);
  const refresh = () => {
    document.body.dataset.searching = "true"; // from the keystroke on, not from when the search starts
    debounced();
  };
  document.getElementById("filter-dag").addEventListener("input", refresh);
  document.getElementById("filter-task").addEventListener("input", refresh);
  document.getElementById("filter-hours").addEventListener("change", () => loadCharts().catch(showError));
  document.querySelector("#decisions button.more").addEventListener("click",
    () => loadList("decisions", decisionRow, true).catch(showError));
  document.querySelector("#fallbacks button.more").addEventListener("click",
    () => loadList("fallbacks", fallbackRow, true).catch(showError));
  try {
    await Promise.all([loadLive(), loadFiltered(), loadStory()]);
    document.body.dataset.state = "ready";
  } catch (err) {
    showError(err);
    document.body.dataset.state = "error";
    return;
  }
  setInterval(() => loadLive().catch(showError), LIVE_EVERY_MS);
}

main();
