// Vigil dashboard: filters, live updates (server-sent events) and operator actions with
// confirmation and progress. Plain JavaScript, no build step.
"use strict";

function csrf() {
  const m = document.querySelector('meta[name="csrf-token"]');
  return m ? m.content : "";
}

function flash(text, kind) {
  const el = document.getElementById("flash");
  if (!el) return;
  const line = document.createElement("div");
  line.className = "msg " + (kind || "");
  line.textContent = text;
  el.prepend(line);
  while (el.children.length > 5) el.lastChild.remove();
  return line;
}

async function api(method, path) {
  const r = await fetch(path, {
    method,
    credentials: "same-origin",
    headers: { "X-CSRF-Token": csrf(), "Accept": "application/json" },
  });
  let body = null;
  try { body = await r.json(); } catch (_) { /* not JSON */ }
  if (!r.ok) {
    throw new Error((body && body.message) || (r.status + " " + r.statusText));
  }
  return body;
}

async function follow(id, label, line) {
  for (let i = 0; i < 600; i++) {
    const c = await api("GET", "/api/commands/" + id);
    line.textContent = label + ": " + c.status + (c.via ? " via " + c.via : "");
    line.dataset.commandStatus = c.status;
    if (c.finished_at) {
      const last = (c.output || "").trim().split("\n").pop();
      line.textContent = label + ": " + c.status + (last ? " — " + last : "");
      line.className = "msg " + (c.status === "succeeded" ? "ok" : "bad");
      return c;
    }
    await new Promise((res) => setTimeout(res, 1000));
  }
}

async function act(button) {
  const service = button.dataset.service;
  const action = button.dataset.action;
  const words = { check: "Run the check of", restart: "Restart", stop: "Stop", start: "Start" };
  if (!window.confirm(words[action] + " " + service + "?")) return;
  const label = action + " " + service;
  const line = flash(label + ": requested…", "pending");
  line.dataset.command = label;
  button.disabled = true;
  try {
    if (action === "check") {
      const r = await api("POST", "/api/health-check/force/" + encodeURIComponent(service) + "?wait=0");
      await follow(r.command.id, label, line);
    } else {
      const r = await api("POST", "/api/services/" + encodeURIComponent(service) + "/" + action);
      await follow(r.command_id, label, line);
    }
  } catch (e) {
    line.textContent = label + ": " + e.message;
    line.className = "msg bad";
    line.dataset.commandStatus = "error";
  } finally {
    button.disabled = false;
  }
}

async function apiJson(method, path, body) {
  const r = await fetch(path, {
    method,
    credentials: "same-origin",
    headers: { "X-CSRF-Token": csrf(), "Accept": "application/json", "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let out = null;
  try { out = await r.json(); } catch (_) { /* not JSON */ }
  if (!r.ok) {
    const field = out && out.field ? " [" + out.field + "]" : "";
    throw new Error(((out && out.message) || (r.status + " " + r.statusText)) + field);
  }
  return out;
}

// Maintenance: a one-off window for the service of the page, and deleting windows.
function maintenance() {
  const form = document.getElementById("maintenance-form");
  if (form) {
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      const f = new FormData(form);
      const body = {
        name: f.get("name"),
        duration: f.get("duration"),
        comment: f.get("comment") || "",
        services: [form.dataset.service],
      };
      if (f.get("from")) body.from = f.get("from") + ":00Z";
      const line = flash("maintenance " + body.name + ": creating…", "pending");
      try {
        const w = await apiJson("POST", "/api/maintenance", body);
        line.textContent = "maintenance window " + w.id + " created";
        line.className = "msg ok";
        line.dataset.maintenance = "created";
        setTimeout(() => window.location.reload(), 500);
      } catch (err) {
        line.textContent = "maintenance: " + err.message;
        line.className = "msg bad";
        line.dataset.maintenance = "error";
      }
    });
  }
  document.querySelectorAll("button[data-maintenance-delete]").forEach((b) => {
    b.addEventListener("click", async (e) => {
      e.preventDefault();
      if (!window.confirm("Delete maintenance window " + b.dataset.name + "?")) return;
      const line = flash("deleting maintenance window " + b.dataset.maintenanceDelete + "…", "pending");
      try {
        await apiJson("DELETE", "/api/maintenance/" + b.dataset.maintenanceDelete);
        line.textContent = "maintenance window " + b.dataset.maintenanceDelete + " deleted";
        line.className = "msg ok";
        setTimeout(() => window.location.reload(), 500);
      } catch (err) {
        line.textContent = "maintenance: " + err.message;
        line.className = "msg bad";
      }
    });
  });
}

function applyFilters() {
  const sel = {};
  document.querySelectorAll("[data-filter]").forEach((f) => { sel[f.dataset.filter] = f.value.trim().toLowerCase(); });
  let shown = 0, total = 0;
  document.querySelectorAll("table.services tbody tr").forEach((tr) => {
    total++;
    const ok = (!sel.category || tr.dataset.category === sel.category)
      && (!sel.node || tr.dataset.node.toLowerCase() === sel.node)
      && (!sel.status || tr.dataset.status === sel.status)
      && (!sel.text || tr.textContent.toLowerCase().includes(sel.text));
    tr.hidden = !ok;
    if (ok) shown++;
  });
  const s = document.getElementById("shown");
  if (s) s.textContent = shown === total ? "" : shown + " of " + total + " shown";
}

function live() {
  const status = document.getElementById("live");
  const rows = document.querySelectorAll("[data-service][data-status]");
  if (!rows.length) return;
  const es = new EventSource("/events");
  es.addEventListener("service", (ev) => {
    const d = JSON.parse(ev.data);
    document.querySelectorAll('[data-service="' + CSS.escape(d.id) + '"][data-status]').forEach((row) => {
      row.dataset.status = d.status;
      const set = (field, text) => {
        row.querySelectorAll('[data-field="' + field + '"]').forEach((c) => { c.textContent = text; });
      };
      const badge = row.querySelector('[data-field="status"]');
      if (badge) { badge.textContent = d.status; badge.className = "badge " + d.status; }
      set("uptime", d.uptime);
      set("response", d.response);
      set("last_check", d.last_check);
      set("last_error", d.last_error);
      [["maintenance", d.maintenance], ["gave_up", d.gave_up]].forEach(([field, text]) => {
        row.querySelectorAll('[data-field="' + field + '"]').forEach((c) => { c.hidden = !text; c.title = text || ""; });
      });
      row.querySelectorAll('button[data-action="start"],button[data-action="stop"]').forEach((b) => {
        const want = d.mode === "stopped" ? "start" : "stop";
        if (b.dataset.action !== want) { b.dataset.action = want; b.textContent = want === "start" ? "Start" : "Stop"; }
      });
    });
    applyFilters();
  });
  es.addEventListener("tick", () => { if (status) { status.textContent = "live"; status.className = "live"; } });
  es.onerror = () => { if (status) { status.textContent = "reconnecting…"; status.className = "muted"; } };
}

document.addEventListener("DOMContentLoaded", () => {
  document.addEventListener("click", (e) => {
    const b = e.target.closest("button[data-action]");
    if (b) { e.preventDefault(); act(b); }
  });
  document.querySelectorAll("[data-filter]").forEach((f) => f.addEventListener("input", applyFilters));
  applyFilters();
  live();
  maintenance();
});
