/* circuitlab viewer: the graph by layer as plain SVG (no library).
   Layout: the embedding at the bottom, then per layer its heads (grouped by key/value head, with one
   shared k/v bracket per group) and above them its MLP with the located neurons beside it; the
   logits at the top. Edges run from a writer's top to the reader it enters. */
"use strict";
var CL = window.CL = window.CL || {};

CL.SVG = "http://www.w3.org/2000/svg";
CL.esc = function (s) {
  return String(s).replace(/[&<>"']/g, function (c) {
    return {"&": "&amp;", "<": "&lt;", ">": "&gt;", "\"": "&quot;", "'": "&#39;"}[c];
  });
};

/* A number as the page shows it: 4 significant digits, exponent for very small or large values. */
CL.fmt = function (v) {
  if (v === null || v === undefined) return "not measured in this run";
  var a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(3);
  return String(Number(v.toPrecision(4)));
};

/* Positions of every node, reader endpoint and unit dot, in a 1000-wide viewBox. */
CL.layout = function (doc) {
  var A = doc.architecture, L = A.n_layers, H = A.n_heads, r = A.group_size;
  var W = 1000, top = 34, block = Math.max(30, Math.min(46, 760 / L)), x0 = 70, headSpan = 620, gap = A.n_kv_heads > 1 ? 14 : 0;
  var step = (headSpan - gap * (A.n_kv_heads - 1)) / H, mlpX = 745;
  var pos = {}, readers = {}, dots = {}, brackets = [];
  function yTop(l) { return top + (L - 1 - l) * block; }
  var height = top + L * block + 44;
  pos.logits = {x: W / 2, y: 16, w: 120, h: 16};
  pos.embed = {x: W / 2, y: height - 18, w: 120, h: 16};
  readers.logits = {x: W / 2, y: 16 + 8};
  var byLayer = {};
  doc.units.forEach(function (u) {
    if (u.component !== "head") (byLayer[u.layer] = byLayer[u.layer] || []).push(u);
  });
  for (var l = 0; l < L; l++) {
    var yh = yTop(l) + block - 18, ym = yTop(l) + 8;
    for (var h = 0; h < H; h++) {
      var g = Math.floor(h / r), x = x0 + (h + 0.5) * step + g * gap;
      pos["a" + l + ".h" + h] = {x: x, y: yh, r: Math.min(7, step / 2.6)};
      readers["a" + l + ".h" + h + ".q"] = {x: x, y: yh + Math.min(7, step / 2.6)};
    }
    for (g = 0; g < A.n_kv_heads; g++) {
      var xa = x0 + g * (r * step + gap), xb = xa + r * step, yb = yh + 9;
      brackets.push({layer: l, group: g, x: xa + 2, w: xb - xa - 4, y: yb, heads: [g * r, g * r + r - 1]});
      readers["a" + l + ".g" + g + ".k"] = {x: xa + (xb - xa) * 0.3, y: yb + 6};
      readers["a" + l + ".g" + g + ".v"] = {x: xa + (xb - xa) * 0.7, y: yb + 6};
    }
    pos["m" + l] = {x: mlpX, y: ym, w: 34, h: 12};
    readers["m" + l] = {x: mlpX, y: ym + 6};
    var us = byLayer[l] || [], sp = Math.min(11, 210 / Math.max(1, us.length));
    us.forEach(function (u, k) { dots[u.id] = {x: mlpX + 28 + k * sp, y: ym, r: Math.min(4, sp / 2.4)}; });
  }
  return {block: block, width: W, height: height, pos: pos, readers: readers, dots: dots, brackets: brackets, yTop: yTop};
};

CL.nodeLabel = function (doc, id) {
  if (id === "embed") return "token embedding";
  if (id === "logits") return "logits (refusal score)";
  var m = /^a(\d+)\.h(\d+)$/.exec(id);
  if (m) {
    var r = doc.architecture.group_size, g = Math.floor(m[2] / r);
    return "attention head " + m[2] + ", layer " + m[1] + (r > 1 ? " (kv group " + g + ")" : "");
  }
  m = /^m(\d+)$/.exec(id);
  return m ? "MLP, layer " + m[1] : id;
};

/* Draw the static part (layer labels, brackets, nodes, unit dots) once per edge set. */
CL.drawNodes = function (svg, doc, lay, activeNodes, onOpen) {
  var A = doc.architecture, parts = [];
  svg.setAttribute("viewBox", "0 0 " + lay.width + " " + lay.height);
  var dir = doc.layers.direction_layer;
  for (var l = 0; l < A.n_layers; l++) {
    parts.push('<text class="layer-label" x="8" y="' + (lay.yTop(l) + lay.block - 14) + '">L' + l +
      (l === dir ? " · dir" : "") + "</text>");
  }
  lay.brackets.forEach(function (b) {
    parts.push('<rect class="kv" data-layer="' + b.layer + '" data-group="' + b.group + '" x="' + b.x + '" y="' +
      b.y + '" width="' + b.w + '" height="6" rx="3"><title>shared key/value head ' + b.group + " of layer " +
      b.layer + " (read by query heads " + b.heads[0] + "–" + b.heads[1] + ")</title></rect>");
    if (A.group_size > 1) parts.push('<text class="kv-label" x="' + (b.x + b.w + 2) + '" y="' + (b.y + 6) + '">k/v</text>');
  });
  svg.innerHTML = '<g id="edges"></g><g id="nodes">' + parts.join("") + "</g>";
  var g = svg.querySelector("#nodes"), stageOf = {};
  doc.units.forEach(function (u) { (stageOf[u.node] = stageOf[u.node] || []).push(u); });
  doc.nodes.forEach(function (n) {
    var p = lay.pos[n.id], active = activeNodes.has(n.id) || !!stageOf[n.id];
    var el = document.createElementNS(CL.SVG, "g"), shape;
    el.setAttribute("class", "node " + (active ? "active" : "idle"));
    el.setAttribute("data-node", n.id);
    if (p.r) {
      shape = '<circle class="shape" cx="' + p.x + '" cy="' + p.y + '" r="' + p.r + '"></circle>';
    } else {
      shape = '<rect class="shape" x="' + (p.x - p.w / 2) + '" y="' + (p.y - p.h / 2) + '" width="' + p.w +
        '" height="' + p.h + '" rx="3"></rect>';
      if (n.kind !== "mlp") shape += '<text x="' + p.x + '" y="' + (p.y + 3.5) + '" text-anchor="middle">' + n.id + "</text>";
      else shape += '<text x="' + p.x + '" y="' + (p.y + 3.5) + '" text-anchor="middle">m' + n.layer + "</text>";
    }
    var units = stageOf[n.id] || [], head = units.filter(function (u) { return u.component === "head"; })[0];
    if (head && p.r) shape += '<circle class="ring" cx="' + p.x + '" cy="' + p.y + '" r="' + (p.r + 2.5) +
      '" stroke="var(--' + head.stage + ')"></circle>';
    el.innerHTML = shape;
    if (active) CL.focusable(el, CL.nodeLabel(doc, n.id) + (head ? ", " + head.stage + " unit" : "") +
      (units.length && !head ? ", " + units.length + " located neuron" + (units.length > 1 ? "s" : "") : ""),
      function () { onOpen({node: n.id}); });
    g.appendChild(el);
  });
  doc.units.forEach(function (u) {
    var d = lay.dots[u.id];
    if (!d) return;
    var el = document.createElementNS(CL.SVG, "g");
    el.setAttribute("class", "node unit-dot active stage-" + u.stage);
    el.setAttribute("data-unit", u.id);
    el.innerHTML = '<path class="shape" d="M' + d.x + " " + (d.y - d.r - 1) + " L" + (d.x + d.r + 1) + " " + d.y +
      " L" + d.x + " " + (d.y + d.r + 1) + " L" + (d.x - d.r - 1) + " " + d.y + ' Z"></path>';
    CL.focusable(el, u.label + ", " + u.stage + " (" + (u.verified ? "verified" : "not verified") + ")",
      function () { onOpen({unit: u.id}); });
    g.appendChild(el);
  });
};

/* Focusable, labelled, opened by click, Enter or Space. */
CL.focusable = function (el, label, open) {
  el.setAttribute("tabindex", "0");
  el.setAttribute("role", "button");
  el.setAttribute("aria-label", label);
  var t = document.createElementNS(CL.SVG, "title");
  t.textContent = label;
  el.insertBefore(t, el.firstChild);
  el.addEventListener("click", open);
  el.addEventListener("keydown", function (e) {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); open(); }
  });
};

/* Draw the visible edges; returns how many were drawn. */
CL.drawEdges = function (svg, lay, edges, maxAbs) {
  var out = [];
  edges.forEach(function (e) {
    var a = lay.pos[e[0]], b = lay.readers[e[1]];
    if (!a || !b) return;
    var y1 = a.r ? a.y - a.r : a.y - a.h / 2, x1 = a.x, x2 = b.x, y2 = b.y, my = (y1 + y2) / 2;
    var f = Math.abs(e[2]) / (maxAbs || 1), w = (0.4 + 3.6 * f).toFixed(2), o = (0.2 + 0.8 * Math.sqrt(f)).toFixed(2);
    out.push('<path class="edge ' + (e[2] >= 0 ? "pos" : "neg") + '" data-writer="' + e[0] + '" data-reader="' + e[1] +
      '" data-score="' + e[2] + '" stroke-width="' + w + '" stroke-opacity="' + o + '" d="M' + x1.toFixed(1) + " " +
      y1.toFixed(1) + " C" + x1.toFixed(1) + " " + my.toFixed(1) + " " + x2.toFixed(1) + " " + my.toFixed(1) + " " +
      x2.toFixed(1) + " " + y2.toFixed(1) + '"></path>');
  });
  svg.querySelector("#edges").innerHTML = out.join("");
  svg.setAttribute("data-visible-edges", String(out.length));
  return out.length;
};
