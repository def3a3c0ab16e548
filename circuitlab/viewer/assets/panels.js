/* circuitlab viewer: the node card, the faithfulness curve, the units table, provenance, legend. */
"use strict";
var CL = window.CL = window.CL || {};

CL.MAIN_MEASURES = ["patch_effect", "atp_estimate", "direction_attribution", "logit_attribution"];

function measureRow(m, v) {
  var cls = v === null || v === undefined ? "num unmeasured" : "num";
  return '<tr><th scope="row" title="' + CL.esc(m.description) + '">' + CL.esc(m.label) + '</th><td class="' + cls +
    '" data-key="' + m.key + '" data-value="' + (v === null || v === undefined ? "" : v) + '">' + CL.fmt(v) + "</td></tr>";
}

function edgeRows(list, other, doc) {
  if (!list.length) return '<p class="hint">none in this edge set</p>';
  var r = doc.architecture.group_size;
  return "<table><tr><th>" + (other === 0 ? "from" : "into") + "</th><th>reader</th><th>score</th></tr>" +
    list.map(function (e) {
      var m = /^a(\d+)\.g(\d+)\.(k|v)$/.exec(e[1]);
      var reader = m ? e[1] + " (shared by heads " + m[2] * r + "–" + (m[2] * r + r - 1) + ")" : e[1];
      return "<tr><td>" + CL.esc(other === 0 ? e[0] : (m ? "a" + m[1] + " k/v group " + m[2] : e[1])) + "</td><td>" +
        CL.esc(reader) + '</td><td class="num">' + CL.fmt(e[2]) + "</td></tr>";
    }).join("") + "</table>";
}

function unitBlock(doc, u) {
  var rows = '<tr><th scope="row">component</th><td>' + CL.esc(u.component) + (u.index !== null ? " " + u.index : "") +
    ", layer " + u.layer + " (graph node " + CL.esc(u.node) + ")</td></tr>" +
    '<tr><th scope="row">stage</th><td data-key="stage">' + CL.esc(u.stage) + "</td></tr>" +
    '<tr><th scope="row">staged by</th><td data-key="stage_rule">' + CL.esc(u.stage_reason) + "</td></tr>" +
    '<tr><th scope="row">verified</th><td data-key="verified">' + (u.verified ? "yes" : "no") + "</td></tr>";
  doc.measures.forEach(function (m) { rows += measureRow(m, u.measures[m.key]); });
  if (u.in_edge_circuit !== null) rows += '<tr><th scope="row">in the edge circuit</th><td>' + (u.in_edge_circuit ? "yes" : "no") +
    (u.edge_in_from ? "; strongest kept in-edge from " + CL.esc(u.edge_in_from) : "") +
    (u.edge_out_to ? "; strongest kept out-edge to " + CL.esc(u.edge_out_to) : "") + "</td></tr>";
  return '<div class="unit ' + CL.esc(u.stage) + '" data-unit="' + CL.esc(u.id) + '"><h3>' + CL.esc(u.label) + "</h3><table>" +
    rows + "</table></div>";
}

/* The card of a node ({node}) or of a located unit ({unit}); idx: the active set's edges by node. */
CL.renderCard = function (doc, target, idx, setLabel) {
  var units, node;
  if (target.unit) {
    units = doc.units.filter(function (u) { return u.id === target.unit; });
    node = units[0].node;
  } else {
    node = target.node;
    units = doc.units.filter(function (u) { return u.node === node; });
  }
  var title = target.unit ? units[0].label + " (node " + node + ")" : node + " · " + CL.nodeLabel(doc, node);
  var body = "";
  if (units.length) units.forEach(function (u) { body += unitBlock(doc, u); });
  else {
    body += '<p class="hint">No located unit in this node.</p><table>';
    doc.measures.filter(function (m) { return CL.MAIN_MEASURES.indexOf(m.key) >= 0; })
      .forEach(function (m) { body += measureRow(m, null); });
    body += "</table>";
  }
  if (/^m\d+$/.test(node)) body += '<p class="hint">The edge graph does not split MLPs: the edges below are the whole MLP ' +
    CL.esc(node) + "'s.</p>";
  var ins = (idx.into[node] || []).slice().sort(CL.byAbs), outs = (idx.out[node] || []).slice().sort(CL.byAbs);
  body += "<h3>Strongest in-edges</h3>" + edgeRows(ins.slice(0, 5), 0, doc) + "<h3>Strongest out-edges</h3>" +
    edgeRows(outs.slice(0, 5), 1, doc) + '<p class="hint">' + ins.length + " edges in, " + outs.length +
    " out, in " + CL.esc(setLabel) + " (the edges this page holds).</p>";
  document.getElementById("card-title").textContent = title;
  var card = document.getElementById("card");
  card.setAttribute("data-target", target.unit || target.node);
  document.getElementById("card-body").innerHTML = body;
  return card;
};

CL.byAbs = function (a, b) { return Math.abs(b[2]) - Math.abs(a[2]); };

/* The faithfulness curve of every edge set (log edge fraction), the random band, the kept point. */
CL.renderCurve = function (svg, tableDiv, doc, activeId, keep) {
  var W = 440, Hh = 240, ml = 40, mr = 10, mt = 10, mb = 34, parts = [];
  var sets = doc.edge_sets, pts = [];
  sets.forEach(function (s) { s.curve.forEach(function (p) { if (p.fraction) pts.push(p); }); });
  svg.setAttribute("viewBox", "0 0 " + W + " " + Hh);
  if (!pts.length) { svg.innerHTML = ""; tableDiv.innerHTML = '<p class="hint">No faithfulness was measured in this run.</p>'; return; }
  var fx = pts.map(function (p) { return Math.log10(p.fraction); });
  var x0 = Math.min.apply(null, fx), x1 = Math.max(0, Math.max.apply(null, fx));
  if (x1 - x0 < 1) x0 = x1 - 1;
  var ymax = Math.max(1.1, Math.max.apply(null, pts.map(function (p) { return p.faithfulness || 0; })) * 1.05);
  var ymin = Math.min(0, Math.min.apply(null, pts.map(function (p) { return p.faithfulness || 0; })));
  function X(f) { return ml + (Math.log10(f) - x0) / (x1 - x0) * (W - ml - mr); }
  function Y(v) { return mt + (ymax - v) / (ymax - ymin) * (Hh - mt - mb); }
  for (var e = Math.ceil(x0); e <= x1; e++) {
    parts.push('<line class="grid" x1="' + X(Math.pow(10, e)) + '" x2="' + X(Math.pow(10, e)) + '" y1="' + mt + '" y2="' + (Hh - mb) + '"/>' +
      '<text class="tick" text-anchor="middle" x="' + X(Math.pow(10, e)) + '" y="' + (Hh - mb + 13) + '">' + (100 * Math.pow(10, e)) + "%</text>");
  }
  [0, 0.5, 1].forEach(function (v) {
    parts.push('<line class="grid" x1="' + ml + '" x2="' + (W - mr) + '" y1="' + Y(v) + '" y2="' + Y(v) + '"' +
      (v === 1 ? ' stroke-dasharray="4 3" stroke="#8c959f"' : "") + '/><text class="tick" text-anchor="end" x="' + (ml - 4) +
      '" y="' + (Y(v) + 3) + '">' + v + "</text>");
  });
  parts.push('<line class="axis" x1="' + ml + '" x2="' + (W - mr) + '" y1="' + (Hh - mb) + '" y2="' + (Hh - mb) + '"/>' +
    '<text class="tick" x="' + ((W + ml) / 2) + '" y="' + (Hh - 4) + '" text-anchor="middle">edges kept (fraction of the graph)</text>');
  var band = (sets.filter(function (s) { return s.random.length; })[0] || {random: []}).random;
  if (band.length) {
    var up = band.map(function (b) { return X(b.fraction) + "," + Y(b.max); });
    var lo = band.slice().reverse().map(function (b) { return X(b.fraction) + "," + Y(b.min); });
    parts.push('<polygon class="band" points="' + up.concat(lo).join(" ") + '"><title>random circuits (min–max)</title></polygon>');
  }
  var colors = ["#1b1f24", "#2166ac", "#d55e00", "#009e73", "#cc79a7"];
  sets.forEach(function (s, i) {
    var c = colors[i % colors.length], ps = s.curve.filter(function (p) { return p.fraction && p.faithfulness !== null; });
    if (ps.length > 1) parts.push('<polyline class="curve-line' + (s.id === activeId ? " active" : "") + '" stroke="' + c +
      '" points="' + ps.map(function (p) { return X(p.fraction) + "," + Y(p.faithfulness); }).join(" ") + '"><title>' +
      CL.esc(s.label) + "</title></polyline>");
    ps.forEach(function (p) {
      parts.push('<circle cx="' + X(p.fraction) + '" cy="' + Y(p.faithfulness) + '" r="' + (ps.length > 1 ? 2.2 : 5) +
        '" fill="' + c + '"><title>' + CL.esc(s.label) + ": " + p.n_edges + " edges, faithfulness " + CL.fmt(p.faithfulness) + "</title></circle>");
    });
  });
  if (keep && keep.fraction) parts.push('<circle class="marker" cx="' + X(keep.fraction) + '" cy="' + Y(keep.faithfulness) + '" r="6"/>');
  svg.innerHTML = parts.join("");
  var rows = sets.map(function (s, i) {
    var p = s.curve.length === 1 ? s.curve[0] : null;
    return '<tr><td><span style="color:' + colors[i % colors.length] + '">■</span> ' + CL.esc(s.label) + '</td><td class="num">' +
      (s.cpr !== null ? CL.fmt(s.cpr) : "–") + '</td><td class="num">' + (s.cmd !== null ? CL.fmt(s.cmd) : "–") + "</td><td>" +
      (p ? p.n_edges + " edges: faithfulness " + CL.fmt(p.faithfulness) : s.curve.length + " circuits") + "</td></tr>";
  });
  var r0 = sets.filter(function (s) { return s.cpr_random !== null && s.cpr_random !== undefined; })[0];
  if (r0) rows.push('<tr><td><span style="color:#aab">■</span> random circuits</td><td class="num">' + CL.fmt(r0.cpr_random) +
    '</td><td class="num">' + CL.fmt(r0.cmd_random) + "</td><td>band: min–max over seeds</td></tr>");
  tableDiv.innerHTML = '<table id="cpr-cmd"><tr><th>edge set</th><th>CPR</th><th>CMD</th><th>measured</th></tr>' + rows.join("") +
    '</table><p class="hint">Faithfulness (m(C) − m(∅)) / (m(N) − m(∅)) on held-out pairs. CPR: area under the curve, CMD: ' +
    "area between it and 1, over the linear edge fraction (MIB).</p>";
};

CL.renderUnits = function (div, doc, onOpen) {
  if (!doc.units.length) {
    div.innerHTML = '<p class="hint">No located units: this run scores edges only (run circuit-map for stages, patch effects and writes).</p>';
    return;
  }
  var keys = CL.MAIN_MEASURES, ms = {};
  doc.measures.forEach(function (m) { ms[m.key] = m; });
  var head = "<tr><th>unit</th><th>stage</th><th>rule</th><th>verified</th>" + keys.map(function (k) {
    return '<th title="' + CL.esc(ms[k].description) + '">' + CL.esc(ms[k].label) + "</th>"; }).join("") + "</tr>";
  div.innerHTML = "<table>" + head + doc.units.map(function (u) {
    return '<tr><td><button class="link" data-open-unit="' + CL.esc(u.id) + '">' + CL.esc(u.label) + "</button></td><td>" +
      CL.esc(u.stage) + "</td><td>" + CL.esc(u.stage_rule) + "</td><td>" + (u.verified ? "yes" : "no") + "</td>" +
      keys.map(function (k) { return '<td class="num">' + (u.measures[k] === null ? "–" : CL.fmt(u.measures[k])) + "</td>"; }).join("") + "</tr>";
  }).join("") + "</table>";
  div.querySelectorAll("button[data-open-unit]").forEach(function (b) {
    b.addEventListener("click", function () { onOpen({unit: b.getAttribute("data-open-unit")}); });
  });
};

CL.renderProvenance = function (div, doc) {
  div.innerHTML = doc.runs.map(function (r) {
    var p = r.provenance, v = r.versions || {};
    var ds = Object.keys(r.datasets || {}).map(function (k) { return k + ": " + r.datasets[k].name; }).join("; ");
    var rows = [["experiment", r.experiment + " (" + r.folder + ")"],
      ["commit", p.commit ? p.commit.slice(0, 12) : "not recorded"],
      ["working tree", p.dirty === null || p.dirty === undefined ? "not recorded" : (p.dirty ? "dirty (diff " + (p.diff_sha256 || "?") + ")" : "clean")],
      ["model", (doc.model.id || "?") + ", fingerprint " + (doc.model.fingerprint || "not recorded")],
      ["ran", (p.started || "?") + (p.wall_seconds ? ", " + p.wall_seconds + " s" : "") + (p.device ? " on " + p.device : "")],
      ["prompts", ds || "not recorded"],
      ["versions", ["circuitlab", "torch", "transformer-lens"].map(function (k) { return k + " " + (v[k] || "?"); }).join(", ")]];
    return "<table data-run=\"" + CL.esc(r.experiment) + "\">" + rows.map(function (x) {
      return '<tr><th scope="row">' + x[0] + '</th><td data-key="' + x[0] + '">' + CL.esc(x[1]) + "</td></tr>"; }).join("") + "</table>";
  }).join("<br>");
};

CL.renderLegend = function (ul) {
  var items = [["var(--pos)", "positive score"], ["var(--neg)", "negative score"], ["var(--detection)", "detection"],
    ["var(--evaluation)", "evaluation"], ["var(--decision)", "decision"], ["var(--production)", "production"]];
  ul.innerHTML = items.map(function (i) { return '<li><span class="sw" style="background:' + i[0] + '"></span>' + i[1] + "</li>"; }).join("") +
    "<li>◆ located neuron (beside its MLP) · ring: located head</li>";
};
