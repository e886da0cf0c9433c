// The datacreator view: polls the JSON API once a second and redraws what changed.
"use strict";

const PAGE = 50;
const state = { selected: null, offset: 0, query: "", examplesKey: "" };

const $ = (sel) => document.querySelector(sel);
const api = (path) => fetch(path).then((r) => (r.ok ? r.json() : Promise.reject(r.status)));
const enc = encodeURIComponent;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else if (k === "onclick") node.onclick = v; else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child ?? ""));
  return node;
}

const money = (v) => (v == null ? "" : "$" + v.toFixed(4));
const pct = (v) => (v == null ? "" : (v * 100).toFixed(0) + "%");
const time = (t) => (t ? new Date(t * 1000).toLocaleTimeString() : "");

function bar(done, total) {
  const share = total ? Math.min(done / total, 1) : 0;
  return el("span", { class: "bar" }, el("div", { style: `width:${(share * 100).toFixed(1)}%` }));
}

function drawRequests(rows) {
  const body = $("#requests tbody");
  body.replaceChildren(...rows.map((r) => {
    const tr = el("tr", { "data-id": r.request_id, onclick: () => select(r.request_id) },
      el("td", {}, r.request_id), el("td", { class: "state-" + r.state }, r.state),
      el("td", {}, bar(r.accepted, r.target_count)), el("td", {}, `${r.accepted}/${r.target_count ?? "?"}`),
      el("td", {}, r.rejected), el("td", {}, (r.examples_per_second || 0).toFixed(2)),
      el("td", {}, r.llm_calls), el("td", {}, r.rate_limited ?? "n/a"), el("td", {}, money(r.cost_usd)),
      el("td", {}, r.budget_used == null ? "no budget" : pct(r.budget_used)));
    if (r.request_id === state.selected) tr.classList.add("selected");
    return tr;
  }));
  if (!state.selected && rows.length) select(rows[0].request_id);
}

function drawDetail(d) {
  $("#detail").hidden = false;
  $("#rid").textContent = d.request_id;
  $("#rstate").textContent = d.state + (d.error ? ` (${d.error})` : "");
  $("#rstate").className = "state-" + d.state;
  $("#instruction").textContent = d.instruction || "";
  const share = d.target_count ? Math.min(d.accepted / d.target_count, 1) : 0;
  $("#progressbar > div").style.width = (share * 100).toFixed(1) + "%";
  const tokens = d.tokens ? `, ${d.tokens.prompt} + ${d.tokens.completion} tokens` : "";
  $("#progresstext").textContent =
    `${d.accepted} of ${d.target_count ?? "?"} accepted, ${d.rejected} rejected, ${d.llm_calls} calls ` +
    `(${d.failed_calls} failed), ${(d.examples_per_second || 0).toFixed(2)} examples/s, cost ${money(d.cost_usd)}` +
    (d.max_cost_usd ? ` of ${money(d.max_cost_usd)}` : "") + tokens + (d.model ? `; ${d.model}` : "");
  const base = `/api/requests/${enc(d.request_id)}`;
  $("#export-jsonl").href = base + "/export.jsonl";
  $("#export-parquet").href = base + "/export.parquet";
  $("#export-manifest").href = base + "/export.jsonl?manifest=1";

  const labels = d.labels.rows;
  const most = Math.max(1, ...labels.map((l) => Math.max(l.count, l.target || 0)));
  $("#labelfield").textContent = d.labels.field ? `(${d.labels.field}` + (d.labels.target_source ? `; target: ${d.labels.target_source})` : ")") : "(no label)";
  $("#labels tbody").replaceChildren(...labels.map((l) =>
    el("tr", {}, el("td", {}, l.label), el("td", {}, l.count), el("td", {}, l.target ?? ""),
      el("td", {}, el("span", { class: "labelbar", style: `width:${(120 * l.count / most).toFixed(0)}px` })))));
  const points = d.diversity.slice(-8).reverse();
  $("#diversity tbody").replaceChildren(...points.map((p) =>
    el("tr", {}, el("td", {}, p.examples), el("td", {}, p.distinct_2.toFixed(3)),
      el("td", {}, p.mean_embedding_distance == null ? "n/a" : p.mean_embedding_distance.toFixed(3)))));
  $("#examplecount").textContent = `(${d.accepted} accepted; ${d.examples_kept} kept here)`;
}

function drawRejections(data) {
  const box = $("#rejections");
  if (!data.reasons.length) { box.replaceChildren(el("p", {}, "none")); return; }
  box.replaceChildren(...data.reasons.map((r) => el("div", { class: "reason", "data-reason": r.reason },
    el("b", {}, r.reason), ` ${r.count}`,
    ...r.samples.map((s) => el("pre", { title: `task ${s.task_id}` }, (s.detail ? s.detail + "\n" : "") + (s.text ?? "(no text)"))))));
}

function drawExamples(page) {
  $("#pageinfo").textContent = page.total ? `${page.offset + 1}–${page.offset + page.items.length} of ${page.total}` : "no examples";
  $("#examples tbody").replaceChildren(...page.items.map((e) => el("tr", { "data-id": e.example_id },
    el("td", {}, time(e.created_at)), el("td", { class: "example" }, JSON.stringify(e.data)),
    el("td", {}, e.label ?? ""),
    el("td", {}, `ref ${(e.reference_ids.map((r) => (r ? r.slice(0, 8) : "seed"))).join(", ")}; chain ${e.chain}, step ${e.step}`),
    el("td", { title: e.task_id }, e.task_id.slice(0, 10)))));
  $("#prev").disabled = page.offset === 0;
  $("#next").disabled = page.offset + page.items.length >= page.total;
}

function treeNode(node) {
  const label = (node.id === "seed" ? "seed: " : `${node.id.slice(0, 8)} (chain ${node.chain}, step ${node.step}${node.label != null ? ", " + node.label : ""}): `) +
    node.preview + (node.children ? `  [${node.children}]` : "");
  const li = el("li", { "data-id": node.id, class: node.children ? "" : "leaf" });
  const span = el("span", { onclick: () => toggle(li) }, label);
  li.append(span);
  return li;
}

async function toggle(li) {
  if (li.classList.contains("leaf")) return;
  if (li.classList.toggle("open")) {
    const data = await api(`/api/requests/${enc(state.selected)}/lineage?parent=${enc(li.dataset.id)}`);
    const more = data.total > data.children.length ? [el("li", { class: "leaf" }, el("span", {}, `… ${data.total - data.children.length} more`))] : [];
    li.append(el("ul", {}, ...data.children.map(treeNode), ...more));
  } else {
    li.querySelector("ul")?.remove();
  }
}

async function drawTreeRoot() {
  const data = await api(`/api/requests/${enc(state.selected)}/lineage`);
  const root = $("#tree").querySelector('li[data-id="seed"]');
  if (!root) { $("#tree").replaceChildren(treeNode(data.node)); return; }
  if (!root.classList.contains("open")) { // keep an expanded tree as the person left it
    root.querySelector("span").textContent = treeNode(data.node).querySelector("span").textContent;
    root.className = data.node.children ? "" : "leaf";
  }
}

function select(id) {
  state.selected = id; state.offset = 0; state.examplesKey = "";
  $("#tree").replaceChildren();
  for (const tr of document.querySelectorAll("#requests tbody tr")) tr.classList.toggle("selected", tr.dataset.id === id);
  refreshDetail();
}

async function refreshDetail() {
  const id = state.selected;
  if (!id) return;
  const base = `/api/requests/${enc(id)}`;
  const [detail, rejections] = await Promise.all([api(base), api(base + "/rejections")]);
  if (id !== state.selected) return;
  drawDetail(detail);
  drawRejections(rejections);
  const key = `${detail.accepted}|${state.offset}|${state.query}`;
  if (key !== state.examplesKey) { // only fetch the page when it can have changed
    state.examplesKey = key;
    drawExamples(await api(`${base}/examples?offset=${state.offset}&limit=${PAGE}&q=${enc(state.query)}`));
  }
  await drawTreeRoot();
}

async function tick() {
  try {
    $("#clock").textContent = new Date().toLocaleTimeString();
    drawRequests((await api("/api/requests")).requests);
    await refreshDetail();
  } catch (err) {
    $("#clock").textContent = "cannot reach the view server (" + err + ")";
  }
  setTimeout(tick, 1000);
}

$("#prev").onclick = () => { state.offset = Math.max(0, state.offset - PAGE); refreshDetail(); };
$("#next").onclick = () => { state.offset += PAGE; refreshDetail(); };
let searchTimer;
$("#search").oninput = (e) => {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(() => { state.query = e.target.value; state.offset = 0; refreshDetail(); }, 300);
};
tick();
