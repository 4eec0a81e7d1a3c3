/* The decision panel: filters the per-cell figures embedded in the page (#decision-data, written by
   qbench/report/decision.py) by the budget the reader types, and picks. Same rule as decision.py's decide():
   the browser check holds the two to the same answer. Every string is set with textContent: result
   content is never parsed as HTML. */
(function () {
  "use strict";
  var node = document.getElementById("decision-data");
  var form = document.getElementById("decision-budget");
  if (!node || !form) { return; }
  var data = JSON.parse(node.textContent);
  var MINUS = "\u2212";

  function value(name) {
    var el = form.elements[name];
    if (!el || el.value.trim() === "") { return null; }  /* an empty field switches its constraint off */
    var v = parseFloat(el.value);
    return isFinite(v) ? v : null;
  }
  function budget() {
    return {kl_max: value("kl_max"), ppl_ratio_max: value("ppl_ratio_max"), acc_drop_pp: value("acc_drop_pp"),
            strict: form.elements.strict.checked};
  }
  function g(x) { return String(Number(x.toPrecision(4))).replace("-", MINUS); }

  /* null when the cell is within budget, else why not (decision.py: within_budget) */
  function whyNot(c, measured, b) {
    if (c.is_baseline) { return null; }
    var checks = [["kl", "KL", b.kl_max], ["ppl_ratio", "PPL ratio", b.ppl_ratio_max]];
    for (var i = 0; i < checks.length; i++) {
      var key = checks[i][0], name = checks[i][1], limit = checks[i][2];
      if (limit === null || !measured[key]) { continue; }
      var f = c[key];
      if (!f) { return name + " not measured"; }
      var v = (b.strict && f.hi !== null) ? f.hi : f.v;
      if (v > limit) { return name + " " + g(v) + " > " + g(limit); }
    }
    if (b.acc_drop_pp !== null && !c.random_weights) {
      for (var j = 0; j < measured.acc.length; j++) {
        var t = measured.acc[j], a = c.acc[t], label = data.tasks[t] || t;
        if (!a) { return label + " \u0394 not measured"; }
        var d = (b.strict && a.lo !== null) ? a.lo : a.v;
        if (d < -b.acc_drop_pp) { return label + " \u0394 " + g(d) + " pp < " + MINUS + g(b.acc_drop_pp); }
      }
    }
    return null;
  }
  function bounds(f) { return (f.lo === null || f.hi === null) ? [f.v, f.v] : [f.lo, f.hi]; }
  function overlap(a, b) { var x = bounds(a), y = bounds(b); return x[0] <= y[1] && y[0] <= x[1]; }

  /* decision.py: decide */
  function decide(m, b) {
    var excluded = {}, ok = [];
    m.cells.forEach(function (c) {
      var why = whyNot(c, m.measured, b);
      if (why) { excluded[c.method] = why; } else { ok.push(c); }
    });
    var sized = ok.filter(function (c) { return c.weights_gb !== null; })
                  .sort(function (x, y) { return x.weights_gb - y.weights_gb; });
    var memory = sized.length ? sized.filter(function (c) {
      return c.weights_gb <= sized[0].weights_gb * (1 + data.memory_tie_fraction); }) : [];
    var decode = {};
    m.batch_sizes.forEach(function (bs) {
      var k = String(bs);
      var ranked = ok.filter(function (c) { return c.decode[k]; })
                     .sort(function (x, y) { return y.decode[k].v - x.decode[k].v; });
      if (ranked.length) {
        decode[k] = ranked.filter(function (c, i) { return i === 0 || overlap(c.decode[k], ranked[0].decode[k]); });
      }
    });
    return {memory: memory, decode: decode, excluded: excluded, n_ok: ok.length};
  }

  function el(tag, text, cls) {
    var e = document.createElement(tag);
    if (text !== undefined && text !== null) { e.textContent = text; }
    if (cls) { e.className = cls; }
    return e;
  }
  function quality(c, m) {
    var parts = [];
    if (m.measured.kl) { parts.push("KL " + c.kl_text); }
    if (m.measured.ppl_ratio) { parts.push("PPL ratio " + c.ppl_ratio_text); }
    m.measured.acc.forEach(function (t) { if (c.acc_text[t]) { parts.push(c.acc_text[t]); } });
    return c.is_baseline ? "the baseline" : parts.join(" \u00b7 ");
  }
  function row(body, what, picks, figures, tieNote, emptyText) {
    var tr = el("tr");
    var th = el("th", what);
    th.setAttribute("scope", "row");
    tr.appendChild(th);
    var td = el("td", null, "pick");
    if (!picks.length) { td.textContent = emptyText || "none within budget"; td.className = "pick none"; }
    picks.forEach(function (c, i) {
      if (i === 1) { td.appendChild(el("span", " tie: ", "tie")); } else if (i > 1) { td.appendChild(document.createTextNode(", ")); }
      td.appendChild(el(i === 0 ? "b" : "span", c.method));
    });
    if (picks.length > 1) { td.appendChild(el("span", " (" + tieNote + ")", "muted")); }
    tr.appendChild(td);
    var fig = el("td", null, "figures");
    picks.forEach(function (c) { fig.appendChild(el("div", c.method + ": " + figures(c))); });
    tr.appendChild(fig);
    body.appendChild(tr);
  }

  function describe(b) {
    var parts = [];
    if (b.kl_max !== null) { parts.push("KL ≤ " + b.kl_max + " nats/token"); }
    if (b.ppl_ratio_max !== null) { parts.push("PPL ratio ≤ " + b.ppl_ratio_max); }
    if (b.acc_drop_pp !== null) { parts.push("accuracy Δ ≥ " + MINUS + b.acc_drop_pp + " pp"); }
    return "Budget: " + (parts.length ? parts.join(", ") : "none") + (b.strict ? ", whole 95 % CI" : "") + ".";
  }

  function isDefault(b) {  /* the budget decision.py's data-expected answer was computed under */
    return ["kl_max", "ppl_ratio_max", "acc_drop_pp", "strict"].every(function (k) {
      return b[k] === data.budget[k]; });
  }

  function render() {
    var b = budget();
    var note = document.getElementById("decision-budget-note");
    if (note) { note.textContent = describe(b); }
    data.models.forEach(function (m, i) {
      var box = document.getElementById("decision-model-" + i);
      var body = box.querySelector("tbody.answer");
      var res = decide(m, b);
      body.textContent = "";
      row(body, "Least weight memory", res.memory, function (c) {
        var q = quality(c, m);
        return c.weights_text + (q ? " \u00b7 " + q : ""); },
          "weights within " + (100 * data.memory_tie_fraction) + " % of each other");
      m.batch_sizes.forEach(function (bs) {
        var k = String(bs);
        row(body, "Fastest decode, batch " + bs, res.decode[k] || [], function (c) { return c.decode[k].text; },
            "95 % CIs overlap the fastest's");
      });
      if (!m.batch_sizes.length) { row(body, "Fastest decode", [], null, "", "not measured in this sweep"); }
      var out = box.querySelector(".excluded");
      var names = Object.keys(res.excluded);
      out.textContent = res.n_ok + " of " + m.cells.length + " finished cells within budget" +
        (names.length ? ". Left out: " + names.map(function (n) { return n + " (" + res.excluded[n] + ")"; }).join("; ") : "") + ".";
      var answer = {memory: res.memory.map(function (c) { return c.method; }), decode: {}};
      Object.keys(res.decode).forEach(function (k) { answer.decode[k] = res.decode[k].map(function (c) { return c.method; }); });
      box.setAttribute("data-answer", JSON.stringify(answer));
      box.setAttribute("data-default-budget", String(isDefault(b)));
    });
  }
  /* A budget travels in the address as #budget&kl_max=0.1&ppl_ratio_max=&acc_drop_pp=2&strict=1 (an empty value:
     constraint off), so a reader can send the answer under their budget; the link below always holds the current
     one. Read on load and when the address changes; the form is only ever written from it. */
  var PREFIX = "#budget&";
  function fromHash() {
    if (location.hash.indexOf(PREFIX) !== 0) { return; }
    var q = new URLSearchParams(location.hash.slice(PREFIX.length));
    ["kl_max", "ppl_ratio_max", "acc_drop_pp"].forEach(function (k) {
      if (q.has(k) && !form.elements[k].disabled) { form.elements[k].value = q.get(k); }
    });
    if (q.has("strict")) { form.elements.strict.checked = q.get("strict") === "1"; }
  }
  function toHash(b) {
    var q = new URLSearchParams();
    ["kl_max", "ppl_ratio_max", "acc_drop_pp"].forEach(function (k) { q.set(k, b[k] === null ? "" : String(b[k])); });
    q.set("strict", b.strict ? "1" : "0");
    return PREFIX + q.toString();
  }
  function update() {
    render();
    var link = document.getElementById("decision-link");
    if (link) { link.setAttribute("href", toHash(budget())); }
  }
  form.addEventListener("input", update);
  form.addEventListener("change", update);
  form.addEventListener("submit", function (e) { e.preventDefault(); });
  window.addEventListener("hashchange", function () { fromHash(); update(); });
  fromHash();
  update();
})();
