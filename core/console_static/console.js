// tuneport console: the page. Plain JavaScript and uPlot (vendored beside this file); every request goes to
// this console's own API, which reads the run folders.
"use strict";

const main = document.getElementById("main");
let leave = [];  // what the current view must stop (event streams, timers) when another one opens

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined) node.setAttribute(k, v);
  }
  for (const c of children.flat()) node.append(c instanceof Node ? c : document.createTextNode(c ?? ""));
  return node;
}

async function api(path, body) {
  const init = body === undefined ? {} :
    { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  const response = await fetch(path, init);
  const found = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(found.error || `${response.status} ${response.statusText}`);
  return found;
}

const enc = (name) => name.split("/").map(encodeURIComponent).join("/");
const num = (v, digits = 4) => (typeof v === "number" ? (Math.abs(v) >= 1e4 || (v !== 0 && Math.abs(v) < 1e-3) ? v.toExponential(2) : +v.toFixed(digits)) : v ?? "");
const mib = (v) => (typeof v === "number" ? `${(v / 2 ** 20).toFixed(0)} MiB` : "");
const badge = (status) => el("span", { class: `badge ${status}` }, status);
const table = (head, rows, attrs = {}) =>
  el("table", attrs, el("tr", {}, head.map((h) => el("th", {}, h))), rows);

// --- charts (uPlot) ------------------------------------------------------------------------------------
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563"];

function chart(box, title, labels) {
  box.replaceChildren(el("h3", {}, title));
  const width = Math.max(380, box.clientWidth - 14);
  const series = [{ label: "step" }, ...labels.map((label, i) =>
    ({ label, stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: true, points: { show: false } }))];
  return new uPlot({ width, height: 220, series, scales: { x: { time: false } }, axes: [{}, { size: 64 }] },
    [[], ...labels.map(() => [])], box);
}

// --- runs ----------------------------------------------------------------------------------------------
async function runsView() {
  main.replaceChildren(el("h1", {}, "Runs"), el("div", { id: "runs-box" }, "Loading…"));
  const compare = el("button", { id: "compare", class: "secondary", onclick: () => {
    const names = [...document.querySelectorAll("input.pick:checked")].map((c) => c.value);
    if (names.length >= 2) location.hash = `#/compare/${names.map(encodeURIComponent).join(",")}`;
  } }, "Compare selected");
  main.append(el("p", { class: "row" }, compare, el("a", { href: "#/start" }, el("button", {}, "New run"))));
  const refresh = async () => {
    const found = await api("/api/runs");
    document.getElementById("root").textContent = found.root;
    const rows = found.runs.map((r) => el("tr", { "data-name": r.name, "data-status": r.status },
      el("td", {}, el("input", { type: "checkbox", class: "pick", value: r.name })),
      el("td", {}, el("a", { href: `#/run/${enc(r.name)}` }, r.name)),
      el("td", { class: "status" }, badge(r.status), r.pid ? ` PID ${r.pid}` : ""),
      el("td", {}, r.model ?? ""), el("td", {}, [r.method, r.objective !== "sft" ? r.objective : ""].filter(Boolean).join(" + ")),
      el("td", {}, r.device ?? ""),
      el("td", { class: "num" }, r.step == null ? "" : `${r.step}${r.total_steps ? ` / ${r.total_steps}` : ""}`),
      el("td", { class: "num" }, num(r.loss)), el("td", { class: "num" }, num(r.tokens_per_s, 0)),
      el("td", { class: "num" }, mib(r.peak_memory))));
    const checked = new Set([...document.querySelectorAll("input.pick:checked")].map((c) => c.value));
    const box = document.getElementById("runs-box");
    if (!box) return;
    box.replaceChildren(found.runs.length ? table(["", "run", "status", "model", "method", "device", "step", "loss",
      "tokens/s", "peak memory"], rows, { id: "runs" }) : el("p", { class: "message" }, `No runs under ${found.root} yet.`));
    for (const c of document.querySelectorAll("input.pick")) c.checked = checked.has(c.value);
  };
  await refresh();
  const timer = setInterval(() => refresh().catch(() => {}), 2000);
  leave.push(() => clearInterval(timer));
}

// --- one run -------------------------------------------------------------------------------------------
const CURVES = [
  ["loss-chart", "loss", ["loss", "eval_loss", "general_loss"]],
  ["lr-chart", "learning rate", ["lr"]],
  ["speed-chart", "tokens per second", ["tokens_per_s"]],
  ["memory-chart", "peak memory (MiB)", ["peak_memory"]],
  ["preference-chart", "preference: reward margin, accuracy", ["margin", "accuracy", "eval_preference"]],
  ["generation-chart", "generation scores", ["rouge-l", "bleu-4"]],
];

function runView(name) {
  const head = el("div", { id: "run-head" });
  const charts = el("div", { class: "charts" });
  const details = el("div", { id: "details" });
  main.replaceChildren(el("h1", {}, name), head, charts, chatPanel(name), details);
  const records = [];
  const plots = {};
  const draw = () => {
    const steps = records.map((r) => r.step);
    for (const [id, title, keys] of CURVES) {
      const present = keys.filter((k) => records.some((r) => r[k] != null));
      if (!present.length) continue;
      let box = document.getElementById(id);
      if (!box || plots[id]?.keys.join() !== present.join()) {
        box = box || charts.appendChild(el("div", { class: "chart", id }));
        plots[id] = { plot: chart(box, title, present), keys: present };
      }
      const scale = id === "memory-chart" ? 2 ** 20 : 1;
      plots[id].plot.setData([steps, ...present.map((k) => records.map((r) => (r[k] == null ? null : r[k] / scale)))]);
      box.dataset.points = String(records.filter((r) => r[keys[0]] != null).length);
    }
  };
  const events = new EventSource(`/api/runs/${enc(name)}/events`);
  events.addEventListener("metrics", (e) => {
    const update = JSON.parse(e.data);
    if (update.reset) records.length = 0;
    records.push(...update.records);
    draw();
  });
  events.addEventListener("run", (e) => showRun(name, JSON.parse(e.data), head, details));
  events.onerror = () => api(`/api/runs/${enc(name)}`).catch((e) => {  // gone: say why, and stop retrying
    events.close();
    head.replaceChildren(el("div", { id: "run-error", class: "error" }, e.message));
  });
  leave.push(() => events.close());
}

function showRun(name, run, head, details) {
  const act = (what) => async () => {
    const out = document.getElementById("action-error");
    out.textContent = "";
    try { await api(`/api/runs/${enc(name)}/${what}`, {}); } catch (e) { out.textContent = e.message; out.className = "error"; }
  };
  const buttons = [];
  if (run.status === "running") buttons.push(el("button", { id: "stop", onclick: act("stop") }, "Stop (saves a checkpoint)"));
  const resumable = run.resume_command && !["running", "finished"].includes(run.status);
  if (resumable) buttons.push(el("button", { id: "resume", onclick: act("resume") }, "Resume"));
  head.replaceChildren(
    el("p", { class: "row" }, el("span", { id: "status", "data-status": run.status }, badge(run.status)),
      el("span", {}, run.pid ? `PID ${run.pid}` : ""), el("span", { id: "step" }, `step ${run.step ?? 0}${run.total_steps ? ` of ${run.total_steps}` : ""}`),
      el("span", {}, [run.model, run.method + (run.objective !== "sft" ? ` + ${run.objective}` : ""), run.device, run.framework].filter(Boolean).join(" · ")),
      ...buttons),
    el("div", { id: "action-error" }),
    run.message ? el("p", { id: "run-message", class: run.status === "stopped" ? "message" : "error" }, run.message) : "",
    resumable ? el("p", {}, "Resume from a shell: ", el("code", { id: "resume-command" }, run.resume_command)) : "");
  const parts = [];
  if (run.baseline || run.forgetting) {
    const keys = Object.keys(run.forgetting || run.baseline);
    parts.push(el("h2", {}, "Forgetting check: evaluation before and after"), table(["", "before", "after", "change"],
      keys.map((k) => { const f = (run.forgetting || {})[k] || {}; return el("tr", {}, el("td", {}, k),
        el("td", { class: "num" }, num(f.before ?? (run.baseline || {})[k])), el("td", { class: "num" }, num(f.after)),
        el("td", { class: "num" }, num(f.change))); }), { id: "forgetting" }));
  }
  const reports = run.reports || {};
  if (reports.eval) {
    const metrics = reports.eval.metrics || {};
    parts.push(el("h2", {}, `tuneport eval: ${reports.eval.data?.file ?? ""}`),
      table(Object.keys(metrics), el("tr", {}, Object.values(metrics).map((v) => el("td", { class: "num" }, num(v, 2)))), { id: "eval" }),
      table(["prompt", "reference", "prediction"], reports.eval.predictions.map((p) =>
        el("tr", {}, el("td", {}, String(p.prompt ?? "").slice(-80)), el("td", {}, p.reference), el("td", {}, p.prediction))),
        { id: "predictions", class: "wrap" }));
  }
  if (reports.parity) {
    const p = reports.parity;
    parts.push(el("h2", {}, `tuneport parity: ${p.a?.side} against ${p.b?.side}: `, el("span", { class: p.passed ? "yes" : "no" }, p.passed ? "every row passes" : "some rows fail")),
      table(["row", "rel. error", "tolerance", "verdict"], (p.rows || []).map((r) => el("tr", {}, el("td", {}, r.row),
        el("td", { class: "num" }, num(r.error)), el("td", { class: "num" }, num(r.tolerance)), el("td", {}, r.pass ? "pass" : "FAIL"))), { id: "parity" }),
      p.plot ? el("img", { src: `/api/runs/${enc(name)}/parity.png`, alt: "parity plot", width: "640" }) : "");
  }
  if (run.resumes?.length) parts.push(el("h2", {}, "Resume history"), table(["time", "PID", "changed"], run.resumes.map((r) =>
    el("tr", {}, el("td", {}, r.time), el("td", {}, String(r.pid)), el("td", {}, JSON.stringify(r.changed || {}))))));
  parts.push(el("h2", {}, "Checkpoints"), run.checkpoints.length ? table(["step", "folder"], run.checkpoints.map((c) =>
    el("tr", {}, el("td", { class: "num" }, String(c.step)), el("td", {}, el("code", {}, c.path)))), { id: "checkpoints" }) : el("p", { class: "message" }, "none yet"));
  if (run.adapter) parts.push(el("p", {}, "Adapter: ", el("code", {}, run.adapter)));
  parts.push(el("details", {}, el("summary", {}, "Recipe (recipe.yaml)"), table(["key", "value"],
    Object.entries(run.recipe).map(([k, v]) => el("tr", {}, el("td", {}, k), el("td", {}, JSON.stringify(v)))))));
  if (run.versions && Object.keys(run.versions).length) parts.push(el("details", {}, el("summary", {}, "Versions"),
    el("pre", {}, Object.entries(run.versions).map(([k, v]) => `${k} ${v ?? "-"}`).join("\n"))));
  if (run.output) parts.push(el("h2", {}, "Output of the command started here"), el("pre", { id: "output" }, run.output));
  details.replaceChildren(...parts);
}

// --- chat: the run's adapter and its base, side by side ------------------------------------------------
function chatPanel(name) {
  const input = el("textarea", { id: "chat-input", rows: "2", cols: "80", placeholder: "a message for both" });
  const sides = { adapter: el("div", { class: "side", id: "chat-adapter" }, el("h3", {}, "tuned (adapter)")),
                  base: el("div", { class: "side", id: "chat-base" }, el("h3", {}, "base")) };
  const history = { adapter: [], base: [] };
  const error = el("div", { id: "chat-error" });
  const send = el("button", { id: "chat-send", onclick: async () => {
    const text = input.value.trim();
    if (!text) return;
    send.disabled = true;
    error.textContent = "";
    try {
      for (const side of ["adapter", "base"]) await stream(side, text);  // one model thread: one after the other
    } catch (e) { error.textContent = e.message; error.className = "error"; }
    send.disabled = false;
  } }, "Send");
  async function stream(side, text) {
    history[side].push({ role: "user", content: text });
    sides[side].append(el("div", { class: "turn user" }, text));
    const reply = sides[side].appendChild(el("div", { class: "turn reply" }));
    const response = await fetch(`/api/runs/${enc(name)}/chat/${side}`, { method: "POST",
      headers: { "Content-Type": "application/json" }, body: JSON.stringify({ messages: history[side] }) });
    if (!response.ok) throw new Error((await response.json().catch(() => ({}))).error || response.statusText);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = JSON.parse(buffer.slice(0, cut).replace(/^data: /, ""));
        buffer = buffer.slice(cut + 2);
        if (event.content) reply.textContent += event.content;
        if (event.error) throw new Error(event.error);
        if (event.finish_reason) reply.dataset.done = event.finish_reason;
      }
    }
    history[side].push({ role: "assistant", content: reply.textContent });
  }
  const clear = el("button", { class: "secondary", onclick: () => {
    for (const side of ["adapter", "base"]) { history[side] = []; sides[side].querySelectorAll(".turn").forEach((t) => t.remove()); }
  } }, "Clear");
  return el("section", {}, el("h2", {}, "Try it: the tuned adapter and its base, greedy, streaming"),
    el("p", { class: "row" }, input, send, clear), error, el("div", { class: "chat" }, sides.adapter, sides.base));
}

// --- compare -------------------------------------------------------------------------------------------
async function compareView(names) {
  main.replaceChildren(el("h1", {}, `Compare ${names.join(", ")}`));
  const found = await api(`/api/compare?names=${names.map(encodeURIComponent).join(",")}`);
  const curves = await Promise.all(names.map((n) => api(`/api/runs/${enc(n)}/metrics`)));
  const steps = [...new Set(curves.flatMap((c) => c.records.map((r) => r.step)))].sort((a, b) => a - b);
  const box = main.appendChild(el("div", { class: "chart", id: "compare-chart" }));
  const plot = chart(box, "training loss", names);
  plot.setData([steps, ...curves.map((c) => { const at = new Map(c.records.map((r) => [r.step, r.loss]));
    return steps.map((s) => at.get(s) ?? null); })]);
  const keys = ["step", "loss", "eval_loss", "tokens_per_s", "peak_memory"];
  main.append(el("h2", {}, "Final metrics"), table(["run", "status", ...keys], found.runs.map((r) => el("tr", {},
    el("td", {}, el("a", { href: `#/run/${enc(r.name)}` }, r.name)), el("td", {}, badge(r.status)),
    keys.map((k) => el("td", { class: "num" }, k === "peak_memory" ? mib(r.final[k]) : num(r.final[k])))))));
  const differing = Object.entries(found.differing);
  main.append(el("h2", {}, `Recipe keys that differ (${differing.length})`), table(["key", ...names], differing.map(([k, values]) =>
    el("tr", { "data-key": k }, el("td", {}, k), values.map((v) => el("td", {}, JSON.stringify(v))))), { id: "differing" }));
}

// --- start a run ---------------------------------------------------------------------------------------
async function startView() {
  const options = await api("/api/options");
  const field = (label, input) => [el("label", { for: input.id }, label), input];
  const recipe = el("select", { id: "recipe" }, options.recipes.map((r) => el("option", { value: r.value }, r.label)));
  recipe.value = options.recipes.find((r) => r.value.endsWith("demo.yaml"))?.value ?? recipe.value;
  const name = el("input", { id: "name", placeholder: "a new folder name under the runs folder, e.g. lora-lr2e-4" });
  const model = el("input", { id: "model", placeholder: "a model folder (empty: the recipe's)" });
  const data = el("input", { id: "data", placeholder: "a training data file (empty: the recipe's)" });
  const device = el("select", { id: "device" }, el("option", { value: "" }, "the recipe's"),
    options.devices.map((d) => el("option", { value: d }, d)));
  const overrides = el("textarea", { id: "overrides", rows: "4", placeholder: "key=value, one per line, e.g. train.lr=1e-4" });
  const memory = el("input", { id: "memory", value: options.host_memory, placeholder: "each card's memory, e.g. 64GiB" });
  const form = () => ({ recipe: recipe.value, name: name.value, model: model.value, data: data.value,
    device: device.value, overrides: overrides.value, memory: memory.value });
  const out = el("div", { id: "start-result" });
  const estimate = el("button", { id: "estimate", class: "secondary", type: "button", onclick: async () => {
    out.replaceChildren(el("p", { class: "message" }, "estimating…"));
    try {
      const found = await api("/api/estimate", form());
      out.replaceChildren(found.fits === null ? "" : el("p", { id: "fits", class: found.fits ? "yes" : "no" },
        found.fits ? `fits in ${memory.value}` : `does not fit in ${memory.value}`), el("pre", {}, found.output));
    } catch (e) { out.replaceChildren(el("div", { id: "start-error", class: "error" }, e.message)); }
  } }, "Estimate memory");
  const start = el("button", { id: "start", type: "button", onclick: async () => {
    start.disabled = true;
    out.replaceChildren(el("p", { class: "message" }, "starting…"));
    try {
      const found = await api("/api/start", form());
      location.hash = `#/run/${enc(found.name)}`;
    } catch (e) { out.replaceChildren(el("div", { id: "start-error", class: "error" }, e.message)); }
    start.disabled = false;
  } }, "Start");
  main.replaceChildren(el("h1", {}, "New run"), el("form", { class: "grid", onsubmit: (e) => e.preventDefault() },
    field("recipe", recipe), field("name", name), field("model folder", model), field("data file", data),
    field("device", device), field("overrides", overrides), field("memory per card", memory)),
    el("p", { class: "row" }, estimate, start), out);
}

// --- the router ----------------------------------------------------------------------------------------
async function route() {
  leave.forEach((stop) => stop());
  leave = [];
  const [, view, arg] = location.hash.match(/^#\/([a-z]*)\/?(.*)$/) || [];
  try {
    if (view === "run") runView(decodeURIComponent(arg));
    else if (view === "compare") await compareView(arg.split(",").map(decodeURIComponent));
    else if (view === "start") await startView();
    else await runsView();
  } catch (e) {
    main.replaceChildren(el("div", { class: "error" }, e.message));
  }
}
window.addEventListener("hashchange", route);
route();
