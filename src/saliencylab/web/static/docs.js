// Renders /openapi.json as a plain page: no Swagger UI, nothing fetched from a CDN.
"use strict";

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function resolve(spec, schema) {
  if (schema && schema.$ref) return resolve(spec, schema.$ref.split("/").slice(1).reduce((o, k) => o[k], spec));
  return schema || {};
}

function typeOf(s) {
  if (s.anyOf) return s.anyOf.map(typeOf).join(" | ");
  if (s.type === "array") return "list of " + typeOf(s.items || {});
  if (s.format === "binary" || s.contentMediaType) return "file";
  return s.type || "any";
}

function paramRows(spec, op) {
  const rows = [];
  for (const p of op.parameters || []) {
    const s = resolve(spec, p.schema);
    rows.push([p.name, p.in, typeOf(s), p.required ? "required" : (s.default !== undefined ? JSON.stringify(s.default) : ""), p.description || s.description || ""]);
  }
  const body = op.requestBody && op.requestBody.content && op.requestBody.content["multipart/form-data"];
  if (body) {
    const s = resolve(spec, body.schema);
    const required = new Set(s.required || []);
    for (const [name, prop0] of Object.entries(s.properties || {})) {
      const prop = resolve(spec, prop0);
      rows.push([name, "form", typeOf(prop), required.has(name) ? "required" : (prop.default !== undefined ? JSON.stringify(prop.default) : ""), prop.description || ""]);
    }
  }
  return rows;
}

async function main() {
  const spec = await (await fetch("/openapi.json")).json();
  document.getElementById("intro").textContent = spec.info.title + " " + spec.info.version + ". " + (spec.info.description || "") +
    " Errors are JSON {\"error\": one line}: 400 bad input, 401 token, 404 unknown result, 413 too large, 503 busy (with Retry-After), 500 with an id.";
  const box = document.getElementById("endpoints");
  for (const [path, ops] of Object.entries(spec.paths)) {
    for (const [verb, op] of Object.entries(ops)) {
      const section = el("section", { class: "endpoint" },
        el("h2", {}, el("span", { class: "verb " + verb, text: verb.toUpperCase() }), " " + path),
        el("p", { text: op.summary || "" }));
      const rows = paramRows(spec, op);
      if (rows.length) {
        const table = el("table", {}, el("thead", {}, el("tr", {}, ...["name", "in", "type", "default", "description"].map((h) => el("th", { text: h })))));
        const tbody = el("tbody");
        for (const r of rows) tbody.append(el("tr", {}, ...r.map((c, i) => el("td", {}, i === 0 ? el("code", { text: c }) : c))));
        table.append(tbody);
        section.append(table);
      }
      box.append(section);
    }
  }
}

document.addEventListener("DOMContentLoaded", () => main().catch((err) => {
  document.getElementById("intro").textContent = "Could not read /openapi.json: " + err.message;
}));
