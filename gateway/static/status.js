// The status page: polls /status.json every second and redraws. No framework, no CDN.
"use strict";
const $ = (id) => document.getElementById(id);
let key = localStorage.getItem("stoker-key") || "";

function mib(bytes) {
  if (bytes === null || bytes === undefined) return "–";
  return bytes >= 1 << 30 ? (bytes / (1 << 30)).toFixed(1) + " GiB" : Math.round(bytes / (1 << 20)) + " MiB";
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  row.appendChild(td);
}

function fill(id, rows, empty) {
  const body = $(id);
  body.replaceChildren();
  if (!rows.length) {
    const tr = document.createElement("tr");
    cell(tr, empty, "");
    tr.firstChild.colSpan = 8;
    body.appendChild(tr);
  }
  for (const values of rows) {
    const tr = document.createElement("tr");
    for (const [text, cls] of values) cell(tr, text, cls);
    body.appendChild(tr);
  }
}

function bar(name, use) {
  const budget = use.budget;
  const share = budget ? Math.min(1, use.used / budget) : 0;
  $(name + "-bar").style.width = (share * 100).toFixed(1) + "%";
  $(name + "-text").textContent = budget ? `${mib(use.used)} of ${mib(budget)}` : `${mib(use.used)} (no budget)`;
}

function draw(data) {
  const s = data.status;
  $("supervisor").textContent =
    `supervisor ${s.supervisor.version}, pid ${s.supervisor.pid}, ${s.supervisor.state}, ` +
    `up ${Math.round(s.supervisor.uptime_s)} s, ${s.supervisor.gpu ? "GPU" : "no GPU"}; gateway served ${data.served}`;
  if (s.memory) { bar("ram", s.memory.ram); bar("vram", s.memory.vram); }
  fill("workers", s.workers.map((w) => [
    [w.model, ""], [w.state, "state-" + w.state], [`${w.running ?? 0}/${w.slots ?? 1}`, ""],
    [mib(w.rss_bytes + w.vram_bytes), ""], [w.idle_s.toFixed(0) + " s", ""], [String(w.served), ""], [String(w.pid), ""],
  ]), "no workers: nothing is loaded");
  fill("queues", Object.entries(s.queues).map(([m, n]) => [[m, ""], [String(n), ""]]), "nothing waits");
  fill("models", data.models.models.map((m) => [
    [m.name, ""], [m.backend, ""], [m.loaded ? "yes" : "no", ""], [String(m.parallel ?? 1), ""],
    [m.embedding ? "yes" : "no", ""], [mib(m.ram_bytes) + (m.memory_measured ? "" : " (estimated)"), ""],
  ]), "no models");
  fill("recent", data.recent.map((r) => [
    [new Date(r.when * 1000).toLocaleTimeString(), ""], [r.api, ""], [r.model, ""], [r.outcome, ""],
    [String(r.tokens), ""], [r.ttft_ms.toFixed(0) + " ms", ""], [r.total_ms.toFixed(0) + " ms", ""],
  ]), "none yet");
  $("updated").textContent = "updated " + new Date().toLocaleTimeString();
}

async function poll() {
  try {
    const res = await fetch("/status.json", { headers: key ? { Authorization: "Bearer " + key } : {} });
    if (res.status === 401) {
      $("key-form").hidden = false;
      $("problem").hidden = false;
      $("problem").textContent = "This gateway needs an API key.";
    } else if (!res.ok) {
      $("problem").hidden = false;
      $("problem").textContent = (await res.json()).error || res.statusText;
    } else {
      $("problem").hidden = true;
      $("key-form").hidden = true;
      draw(await res.json());
    }
  } catch (err) {
    $("problem").hidden = false;
    $("problem").textContent = "The gateway does not answer: " + err;
  }
  setTimeout(poll, 1000);
}

$("key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  key = $("key").value;
  localStorage.setItem("stoker-key", key);
});
poll();
