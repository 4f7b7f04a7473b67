// The inspection page: only the deployment's public API, no framework, no build step.
"use strict";
const KEY = "plantad.apiKey";  // sessionStorage: gone when the tab closes
const $ = (id) => document.getElementById(id);
const fmt = (v) => (v === null || v === undefined ? "—" : Number(v).toFixed(4));
const state = { calibrated: 0.5, saved: null, cards: [], traffic: [] };

function lineName() { return $("line").value.trim() || null; }

async function api(path, options = {}, retry = true) {
  let response;
  const sent = sessionStorage.getItem(KEY);
  for (let attempt = 0; attempt < 4; attempt++) {  // 503: Serve's queue is full for a moment; try again
    const headers = new Headers(options.headers || {});
    const key = sessionStorage.getItem(KEY);
    if (key) headers.set("Authorization", "Bearer " + key);
    response = await fetch(path, { ...options, headers });
    if (response.status !== 503) break;
    await new Promise((done) => setTimeout(done, 250 * 2 ** attempt));
  }
  if (response.status === 401 && retry) {
    if (sessionStorage.getItem(KEY) === sent) await askKey();  // else a key was given meanwhile: use it
    return api(path, options, false);
  }
  return response;
}

async function json(path, options) {
  const response = await api(path, options);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || `${path}: HTTP ${response.status}`);
  return body;
}

let keyPrompt = null;  // one prompt, however many requests were refused at once
function askKey() {
  if (!keyPrompt) {
    keyPrompt = new Promise((resolve) => {
      const dialog = $("key-dialog");
      dialog.addEventListener("close", () => { keyPrompt = null; resolve(); }, { once: true });
      if (!dialog.open) dialog.showModal();
    });
  }
  return keyPrompt;
}

function decide(p, band) { return p < band.low ? "OK" : p >= band.high ? "NG" : "REVIEW"; }
function pageBand() { return { low: Number($("band-low").value), high: Number($("band-high").value) }; }

function decisionBadge(decision) {
  const span = document.createElement("span");
  span.className = "decision " + decision;
  span.textContent = decision;
  return span;
}

function definitionList(pairs) {
  const dl = document.createElement("dl");
  for (const [term, value] of pairs) {
    const dt = document.createElement("dt"); dt.textContent = term;
    const dd = document.createElement("dd");
    if (value instanceof Node) dd.append(value); else dd.textContent = value;
    dl.append(dt, dd);
  }
  return dl;
}

function figure(src, result) {
  const fig = document.createElement("figure");
  const img = document.createElement("img");
  img.src = src; img.alt = `image ${result.name}`;
  fig.append(img);
  if (result.heatmap_png) {
    const heat = document.createElement("img");
    heat.className = "heat"; heat.alt = `anomaly heatmap of ${result.name}`;
    heat.src = "data:image/png;base64," + result.heatmap_png;
    heat.style.opacity = $("opacity").value;
    fig.append(heat);
  }
  if (result.box) {
    const b = result.box, box = document.createElement("div");
    box.className = "box"; box.setAttribute("role", "img"); box.setAttribute("aria-label", "most anomalous region");
    Object.assign(box.style, { left: `${100 * b.x0 / result.width}%`, top: `${100 * b.y0 / result.height}%`,
      width: `${100 * (b.x1 - b.x0) / result.width}%`, height: `${100 * (b.y1 - b.y0) / result.height}%` });
    fig.append(box);
  }
  return fig;
}

function scoredCard(file, result) {
  const card = document.createElement("article");
  card.className = "card scored";
  card.setAttribute("aria-label", `result for ${result.name}`);
  if (result.status !== 200) {
    card.append(Object.assign(document.createElement("p"), { className: "error", textContent: `${result.name}: ${result.error}` }));
    return card;
  }
  card.dataset.probability = result.probability;
  card.dataset.name = result.name;
  const badge = decisionBadge(result.decision);
  badge.dataset.role = "decision";
  const probability = Object.assign(document.createElement("span"), { className: "probability", textContent: fmt(result.probability) });
  card.append(figure(URL.createObjectURL(file), result), definitionList([
    ["image", result.name], ["probability", probability], ["decision", badge],
    ["p local", fmt(result.p_local)], ["p semantic", fmt(result.p_semantic)],
    ["model version", result.model_version], ["band", `${result.band.low.toFixed(3)} – ${result.band.high.toFixed(3)} (${result.band.source}${result.band.rates ? ", " + bandText(result.band.rates) : ""})`],
  ]));
  return card;
}

async function scoreFiles(files) {
  if (!files.length) return;
  const form = new FormData();
  for (const f of files) form.append("files", f, f.name);
  form.append("heatmap", "true");
  if (lineName()) form.append("line", lineName());
  $("score-status").textContent = `scoring ${files.length} image(s)…`;
  try {
    const answer = await json("score", { method: "POST", body: form });
    answer.results.forEach((r, i) => {
      $("cards").prepend(scoredCard(files[i], r));
      if (r.status === 200) state.cards.push(r.probability);
    });
    $("score-status").textContent = `scored ${answer.scored}, failed ${answer.failed} (model version ${answer.model.version})`;
    redecide(); drawHistogram();
  } catch (err) { $("score-status").textContent = "scoring failed: " + err.message; }
}

function redecide() {
  const band = pageBand();
  $("band-low-value").textContent = band.low.toFixed(3);
  $("band-high-value").textContent = band.high.toFixed(3);
  for (const card of document.querySelectorAll(".card.scored[data-probability]")) {
    const badge = card.querySelector("[data-role=decision]");
    const decision = decide(Number(card.dataset.probability), band);
    badge.className = "decision " + decision; badge.textContent = decision;
  }
  drawHistogram();
}

function drawHistogram() {
  const canvas = $("histogram"), ctx = canvas.getContext("2d"), W = canvas.width, H = canvas.height, bins = 50;
  const scores = state.cards.concat(state.traffic.map((t) => t.probability));
  const counts = new Array(bins).fill(0);
  for (const p of scores) counts[Math.min(bins - 1, Math.floor(p * bins))] += 1;
  const top = Math.max(1, ...counts);
  ctx.clearRect(0, 0, W, H);
  ctx.fillStyle = "#6d8797";
  counts.forEach((c, i) => ctx.fillRect(i * W / bins + 1, H - 14 - (H - 24) * c / top, W / bins - 2, (H - 24) * c / top));
  const band = pageBand();
  for (const [value, color] of [[band.low, "#1b7f3b"], [band.high, "#b3261e"]]) {
    ctx.strokeStyle = color; ctx.lineWidth = 3;
    ctx.beginPath(); ctx.moveTo(value * W, 0); ctx.lineTo(value * W, H - 12); ctx.stroke();
  }
  ctx.fillStyle = "#333"; ctx.font = "11px sans-serif";
  ["0", "0.5", "1"].forEach((t, i) => ctx.fillText(t, i === 2 ? W - 10 : i * W / 2, H - 2));
}

function dragThresholds() {  // drag the nearer threshold line on the histogram (the sliders do the same by keyboard)
  const canvas = $("histogram");
  let dragging = null;
  const valueAt = (e) => Math.min(1, Math.max(0, (e.clientX - canvas.getBoundingClientRect().left) / canvas.getBoundingClientRect().width));
  canvas.addEventListener("pointerdown", (e) => {
    const v = valueAt(e), band = pageBand();
    dragging = Math.abs(v - band.low) <= Math.abs(v - band.high) ? "band-low" : "band-high";
    canvas.setPointerCapture(e.pointerId);
  });
  canvas.addEventListener("pointermove", (e) => { if (dragging) { setThreshold(dragging, valueAt(e)); } });
  canvas.addEventListener("pointerup", () => { dragging = null; });
}

function setThreshold(id, value) {
  const band = pageBand();
  if (id === "band-low") value = Math.min(value, band.high); else value = Math.max(value, band.low);
  $(id).value = value;
  redecide();
}

async function loadBands() {
  const status = await json("bands");
  state.calibrated = status.calibrated;
  const line = lineName();
  const band = (line && status.lines[line]) || status.default;
  $("band-low").value = band.low; $("band-high").value = band.high;
  const rates = band.saved && "low_frr" in band.saved ? ` (${bandText(band.saved)} on normal parts, for version ${status.model_version})` : "";
  $("band-status").textContent = `line ${line || "default"}: band ${band.low.toFixed(3)} – ${band.high.toFixed(3)}${rates}; calibrated threshold ${status.calibrated.toFixed(4)}` + (status.store ? "" : " (serve.store not set: bands cannot be saved)");
  redecide();
  await loadAudit();
}

async function saveBands() {
  const line = lineName() || "default";
  try {
    const change = await json(`bands/${encodeURIComponent(line)}`, { method: "PUT", headers: { "Content-Type": "application/json" }, body: JSON.stringify(pageBand()) });
    $("band-status").textContent = `saved for line ${line}: ${bandText(change.new)}`;
    await loadAudit();
  } catch (err) { $("band-status").textContent = "not saved: " + err.message; }
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const c of cells) tr.append(Object.assign(document.createElement("td"), { textContent: c }));
  return tr;
}

const when = (t) => new Date(t * 1000).toLocaleString();
const pct = (r) => `${(100 * r).toFixed(2)}%`;
const bandText = (b) => (!b ? "reset" : "low_frr" in b ? `false rejects ${pct(b.low_frr)} / ${pct(b.high_frr)}`
  : `${b.low.toFixed(3)} – ${b.high.toFixed(3)}`);

async function loadAudit() {
  const { changes } = await json("bands/audit?limit=50");
  $("audit").tBodies[0].replaceChildren(...changes.map((c) => row([when(c.at), c.who, c.line, bandText(c.old), bandText(c.new), c.model_version])));
}

async function reviewCard(item) {
  const card = document.createElement("article");
  card.className = "card queued"; card.dataset.sha256 = item.sha256;
  card.setAttribute("aria-label", `review ${item.part_id || item.sha256.slice(0, 12)}`);
  const blob = await (await api(`review/images/${item.sha256}`)).blob();
  const img = Object.assign(document.createElement("img"), { src: URL.createObjectURL(blob), alt: `part ${item.part_id || item.sha256.slice(0, 12)}` });
  const fig = document.createElement("figure"); fig.append(img);
  const defect = Object.assign(document.createElement("input"), { placeholder: "defect name", value: "" });
  defect.setAttribute("aria-label", "defect name");
  const normal = Object.assign(document.createElement("button"), { type: "button", textContent: "Normal (false alarm)" });
  const bad = Object.assign(document.createElement("button"), { type: "button", textContent: "Defective" });
  normal.addEventListener("click", () => sendVerdict(card, { sha256: item.sha256, verdict: "normal" }));
  bad.addEventListener("click", () => sendVerdict(card, { sha256: item.sha256, verdict: "defective", defect: defect.value.trim() }));
  const actions = document.createElement("div"); actions.className = "actions"; actions.append(normal, defect, bad);
  card.append(fig, definitionList([["line", item.line || "—"], ["part", item.part_id || "—"], ["probability", fmt(item.probability)],
    ["decision", decisionBadge(item.decision)], ["model version", item.model_version], ["scored", when(item.time)]]), actions);
  return card;
}

async function sendVerdict(card, verdict) {
  try {
    await json("review", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(verdict) });
    card.remove();
    $("review-status").textContent = `marked ${verdict.sha256.slice(0, 12)} as ${verdict.verdict}${verdict.defect ? " (" + verdict.defect + ")" : ""}`;
  } catch (err) { $("review-status").textContent = "not saved: " + err.message; }
}

async function loadQueue() {
  $("queue").setAttribute("aria-busy", "true");
  try {
    const { items } = await json("review/queue?limit=48");
    $("queue").replaceChildren(...await Promise.all(items.map(reviewCard)));
    $("review-status").textContent = `${items.length} image(s) to review`;
  } catch (err) { $("review-status").textContent = err.message; }
  $("queue").setAttribute("aria-busy", "false");
}

async function loadTraffic() {
  const q = new URLSearchParams({ limit: "200" });
  if ($("traffic-line").value.trim()) q.set("line", $("traffic-line").value.trim());
  if ($("traffic-decision").value) q.set("decision", $("traffic-decision").value);
  const t = await json("traffic?" + q);
  if (!t.enabled) { $("traffic-rates").textContent = "recent traffic is off (serve.recent_traffic: 0)"; return; }
  state.traffic = t.items;
  const rates = Object.entries(t.rates).map(([d, r]) => `${d} ${(100 * r).toFixed(1)}%`).join(", ");
  $("traffic-rates").textContent = `last hour on this replica: ${t.last_hour} image(s)${rates ? ": " + rates : ""}`;
  $("traffic-table").tBodies[0].replaceChildren(...t.items.map((r) => row([when(r.time), r.line || "—", r.part_id || "—", fmt(r.probability), r.decision, r.model_version])));
  drawHistogram();
}

function promotedAt(info) {  // when plantad pointed the alias at this version (MLflow keeps no alias times)
  if (!info.promoted_at) return "— (alias not set by plantad)";
  const t = Object.assign(document.createElement("time"), { id: "promoted-at", textContent: when(info.promoted_at) });
  t.dateTime = new Date(info.promoted_at * 1000).toISOString();
  const span = document.createElement("span");
  span.append(t, ` (@${info.promoted_alias} set by plantad)`);
  return span;
}

async function loadModel() {
  const [m, info] = await Promise.all([json("model"), json("inspection")]);
  $("model-summary").textContent = `model ${m.name} v${m.version} (${m.alias || "fixed"}), threshold ${fmt(m.threshold)}`;
  const metrics = Object.entries(m.metrics || {}).map(([k, v]) => `${k} ${fmt(v)}`).join(", ");
  $("model-info").replaceChildren(...definitionList([["name", m.name], ["version", m.version], ["alias", m.alias || "—"],
    ["promoted", promotedAt(info)],
    ["loaded here", when(m.loaded_at)], ["data version", JSON.stringify(m.data_version)], ["teacher", JSON.stringify(m.teacher)],
    ["metrics", metrics || "—"], ["runtime", m.runtime]]).childNodes);
  if (info.mlflow_ui_url && m.run_id) {
    Object.assign($("run-link"), { href: `${info.mlflow_ui_url.replace(/\/$/, "")}/#/runs/${m.run_id}`, hidden: false });
  }
  $("known-lines").replaceChildren(...info.lines.map((l) => Object.assign(document.createElement("option"), { value: l })));
  return info;
}

function wire() {
  $("key-form").addEventListener("submit", () => sessionStorage.setItem(KEY, $("key-input").value.trim()));
  $("key-forget").addEventListener("click", () => { sessionStorage.removeItem(KEY); $("key-dialog").close(); });
  $("key-button").addEventListener("click", () => $("key-dialog").showModal());
  $("files").addEventListener("change", (e) => scoreFiles([...e.target.files]));
  const drop = $("drop");
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("files").click(); } });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); scoreFiles([...e.dataTransfer.files]); });
  $("opacity").addEventListener("input", () => document.querySelectorAll("img.heat").forEach((i) => { i.style.opacity = $("opacity").value; }));
  $("band-low").addEventListener("input", () => setThreshold("band-low", Number($("band-low").value)));
  $("band-high").addEventListener("input", () => setThreshold("band-high", Number($("band-high").value)));
  $("band-save").addEventListener("click", saveBands);
  $("line").addEventListener("change", () => loadBands().catch((e) => { $("band-status").textContent = e.message; }));
  $("review-refresh").addEventListener("click", loadQueue);
  $("traffic-refresh").addEventListener("click", () => loadTraffic().catch((e) => { $("traffic-rates").textContent = e.message; }));
  dragThresholds();
}

async function start() {
  wire();
  try {
    const info = await loadModel();
    await loadBands();
    if (info.records) await loadQueue(); else $("review-status").textContent = "the review queue is off (serve.records.enabled: false)";
    await loadTraffic();
    document.body.dataset.ready = "true";
  } catch (err) { $("model-summary").textContent = "cannot reach the deployment: " + err.message; }
}
start();
