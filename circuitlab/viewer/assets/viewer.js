/* circuitlab viewer: state and controls (edge set, edge threshold, keep-faithfulness), wiring it all. */
"use strict";
(function () {
  var CL = window.CL;
  var raw = document.getElementById("graph-data").textContent;
  var doc = JSON.parse(raw), lay = CL.layout(doc), svg = document.getElementById("graph");
  var sets = {}, index = {}, owners = {};
  doc.readers.forEach(function (r) { owners[r.id] = r.owners.length ? r.owners : [r.id]; });
  doc.edge_sets.forEach(function (s) {
    sets[s.id] = s;
    var into = {}, out = {}, nodes = new Set(), maxAbs = 0, minAbs = Infinity;
    s.edges.forEach(function (e) {
      (out[e[0]] = out[e[0]] || []).push(e);
      owners[e[1]].forEach(function (o) { (into[o] = into[o] || []).push(e); nodes.add(o); });
      nodes.add(e[0]);
      var a = Math.abs(e[2]);
      if (a > maxAbs) maxAbs = a;
      if (a > 0 && a < minAbs) minAbs = a;
    });
    index[s.id] = {into: into, out: out, nodes: nodes, maxAbs: maxAbs, minAbs: minAbs === Infinity ? maxAbs : minAbs};
  });
  var state = {set: doc.default_edge_set, threshold: 0, faith: 0, target: null, opener: null};
  var thr = document.getElementById("threshold"), faith = document.getElementById("faith");

  function threshold() {
    var ix = index[state.set], v = state.threshold;
    if (!ix || v <= 0 || !ix.maxAbs) return 0;
    var lo = Math.log(ix.minAbs), hi = Math.log(ix.maxAbs);
    return Math.exp(lo + (v / 100) * (hi - lo));
  }

  /* The smallest measured circuit with faithfulness >= x: {point, index, onPage} or null. */
  function kept(s, x) {
    for (var i = 0; i < s.curve.length; i++) {
      var p = s.curve[i];
      if (p.faithfulness !== null && p.faithfulness >= x) return {point: p, index: i, onPage: p.included};
    }
    return null;
  }

  function visibleEdges() {
    var s = sets[state.set], t = threshold(), note = "", keep = null;
    if (!s) return {edges: [], note: "", keep: null};
    var edges = s.edges;
    if (state.faith > 0) {
      keep = kept(s, state.faith);
      if (!keep) note = "no measured circuit of this set reaches faithfulness " + state.faith.toFixed(2) + "; showing every edge the page holds";
      else if (!keep.onPage) note = "the smallest circuit with faithfulness ≥ " + state.faith.toFixed(2) + " has " + keep.point.n_edges +
        " edges, more than this page holds; showing every edge the page holds";
      else {
        note = "smallest measured circuit with faithfulness ≥ " + state.faith.toFixed(2) + ": " + keep.point.n_edges + " edges" +
          (keep.point.fraction ? " (" + CL.fmt(100 * keep.point.fraction) + "% of the graph)" : "") + ", faithfulness " + CL.fmt(keep.point.faithfulness);
        edges = edges.filter(function (e) { return e[3] !== null && e[3] <= keep.index; });
      }
    }
    if (t > 0) edges = edges.filter(function (e) { return Math.abs(e[2]) >= t; });
    return {edges: edges, note: note, keep: keep && keep.onPage ? keep.point : null};
  }

  function update() {
    var s = sets[state.set], v = visibleEdges(), ix = index[state.set];
    var n = s ? CL.drawEdges(svg, lay, v.edges, ix.maxAbs) : 0;
    var lit = new Set();
    v.edges.forEach(function (e) { lit.add(e[0]); owners[e[1]].forEach(function (o) { lit.add(o); }); });
    svg.querySelectorAll("g.node[data-node]").forEach(function (g) {
      var id = g.getAttribute("data-node");
      g.classList.toggle("lit", lit.has(id) && id !== "embed" && id !== "logits");
    });
    svg.querySelectorAll("rect.kv").forEach(function (r) {
      var key = "a" + r.getAttribute("data-layer") + ".g" + r.getAttribute("data-group");
      r.classList.toggle("active", v.edges.some(function (e) { return e[1].indexOf(key + ".") === 0; }));
    });
    var t = threshold();
    document.getElementById("threshold-out").textContent = t > 0 ? "|score| ≥ " + CL.fmt(t) : "off (every edge)";
    document.getElementById("faith-out").textContent = state.faith > 0 ? state.faith.toFixed(2) : "off";
    document.getElementById("status").textContent = s ? n + " of " + s.edges.length + " edges shown · " + s.label +
      (v.note ? " · " + v.note : "") : "No edges in this run: " + ((doc.runs[0].summary || {}).edge_circuit || "edge stage not run");
    svg.setAttribute("aria-label", "Circuit graph: " + n + " edges shown");
    CL.renderCurve(document.getElementById("curve"), document.getElementById("curve-table"), doc, state.set, v.keep);
    if (state.target) open(state.target, false);
  }

  function open(target, focus) {
    state.target = target;
    var s = sets[state.set];
    var card = CL.renderCard(doc, target, index[state.set] || {into: {}, out: {}}, s ? s.label : "no edge set");
    svg.querySelectorAll(".node.selected").forEach(function (g) { g.classList.remove("selected"); });
    var sel = svg.querySelector(target.unit ? '[data-unit="' + target.unit + '"]' : '[data-node="' + target.node + '"]');
    if (sel) sel.classList.add("selected");
    if (focus !== false) { state.opener = document.activeElement; card.focus(); }
  }

  /* A first view that reads: the lowest threshold that shows at most START_EDGES edges. */
  var START_EDGES = 400;
  function startThreshold() {
    var s = sets[state.set];
    state.threshold = 0;
    if (!s || s.edges.length <= START_EDGES) return;
    while (state.threshold < 100 && visibleEdges().edges.length > START_EDGES) state.threshold += 1;
  }

  function selectSet(id) {
    state.set = id;
    if (!state.touched) { startThreshold(); thr.value = String(state.threshold); }
    CL.drawNodes(svg, doc, lay, index[id] ? index[id].nodes : new Set(), open);
    update();
  }

  var fs = document.getElementById("edge-sets");
  doc.edge_sets.forEach(function (s, i) {
    var label = document.createElement("label"), input = document.createElement("input");
    input.type = "radio"; input.name = "edge-set"; input.value = s.id; input.id = "set-" + i;
    input.checked = s.id === state.set;
    input.addEventListener("change", function () { if (input.checked) selectSet(s.id); });
    label.appendChild(input);
    label.appendChild(document.createTextNode(" " + s.label));
    label.title = s.description;
    fs.appendChild(label);
  });
  if (!doc.edge_sets.length) { thr.disabled = true; faith.disabled = true; }
  var fmax = 1;
  doc.edge_sets.forEach(function (s) { s.curve.forEach(function (p) { if (p.faithfulness > fmax) fmax = p.faithfulness; }); });
  faith.max = String(Math.ceil(fmax * 20) / 20);
  thr.addEventListener("input", function () { state.touched = true; state.threshold = Number(thr.value); update(); });
  faith.addEventListener("input", function () { state.faith = Number(faith.value); update(); });
  document.getElementById("card").addEventListener("keydown", function (e) {
    if (e.key === "Escape" && state.opener && state.opener.focus) state.opener.focus();
  });

  var prov = doc.runs[0].provenance || {};
  document.getElementById("title").textContent = "circuitlab · " + doc.title;
  document.getElementById("subtitle").textContent = "model " + (doc.model.id || "?") + " (fingerprint " +
    (doc.model.fingerprint || "not recorded") + ") · commit " + (prov.commit ? prov.commit.slice(0, 10) : "not recorded") +
    (prov.dirty ? " (dirty)" : prov.dirty === false ? " (clean)" : "") + " · " + doc.architecture.n_layers + " layers, " +
    doc.architecture.n_heads + " heads, " + doc.architecture.n_kv_heads + " kv heads";
  var link = document.getElementById("download-json");
  link.href = URL.createObjectURL(new Blob([raw], {type: "application/json"}));
  CL.renderUnits(document.getElementById("units"), doc, open);
  CL.renderProvenance(document.getElementById("provenance"), doc);
  CL.renderLegend(document.getElementById("legend"));
  selectSet(state.set);
  document.body.setAttribute("data-ready", "1");
})();
