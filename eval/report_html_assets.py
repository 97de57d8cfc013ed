"""The style sheet and the script of report.html, inlined into the page (no file beside it, nothing
fetched). The script reads the page's data from its `<script type="application/json">` element,
puts each thumbnail in place, switches the encoder shown, filters the retrieval queries and shows a
tracklet's frames when the pointer is on its point of the map. It writes data into the page only
through textContent and attributes, never as markup."""

from __future__ import annotations

CSS = """
:root { --right: #1a9e3a; --wrong: #d62728; --query: #2864c8; --line: #d0d4da; --muted: #5b6470; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; color: #1d2329;
  background: #f6f7f9; }
header, section { max-width: 1280px; margin: 0 auto; padding: 12px 24px; }
header { background: #fff; border-bottom: 1px solid var(--line); max-width: none; }
h1 { font-size: 22px; margin: 4px 0 8px; }
h2 { font-size: 18px; margin: 18px 0 6px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
h3 { font-size: 15px; margin: 14px 0 4px; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: 2px 12px; margin: 0; font-size: 13px; }
dl.meta dt { color: var(--muted); } dl.meta dd { margin: 0; word-break: break-all; }
nav { position: sticky; top: 0; z-index: 5; background: #1d2329; padding: 6px 24px; display: flex;
  gap: 14px; flex-wrap: wrap; align-items: center; }
nav a { color: #e8edf3; text-decoration: none; font-size: 13px; } nav a:hover { text-decoration: underline; }
nav label { color: #e8edf3; margin-left: auto; font-size: 13px; }
p.help { color: var(--muted); margin: 4px 0 8px; max-width: 980px; }
table.grid { border-collapse: collapse; background: #fff; font-size: 13px; margin: 6px 0; }
table.grid th, table.grid td { border: 1px solid var(--line); padding: 4px 8px; }
table.grid thead th { background: #eef1f5; font-weight: 600; }
table.grid td.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
table.grid tbody th { text-align: left; font-weight: 600; white-space: nowrap; }
td.flag { background: #fff4e0; } td.better { color: var(--right); } td.worse { color: var(--wrong); }
td.num .ci { display: block; font-size: 11px; color: var(--muted); }
.scroll { overflow-x: auto; }
.filters { display: flex; gap: 10px; align-items: center; flex-wrap: wrap; margin: 8px 0; }
.filters input[type=search] { width: 260px; padding: 4px 6px; }
.count { color: var(--muted); font-size: 13px; }
.query { display: flex; gap: 6px; align-items: flex-start; background: #fff; border: 1px solid var(--line);
  border-radius: 6px; padding: 6px; margin: 6px 0; }
.query .info { font-size: 12px; color: var(--muted); margin-left: 8px; align-self: center; max-width: 220px; }
figure.thumb { margin: 0; width: 84px; text-align: center; font-size: 11px; line-height: 1.25; }
figure.thumb img, figure.thumb .noimg { width: 72px; height: 72px; display: block; margin: 0 auto 2px;
  border: 4px solid #999; border-radius: 3px; background: #ddd; }
figure.thumb .noimg { font-size: 10px; padding-top: 20px; color: var(--muted); }
figure.query-thumb img { border-color: var(--query); } figure.right img { border-color: var(--right); }
figure.wrong img { border-color: var(--wrong); }
figure.right figcaption b { color: var(--right); } figure.wrong figcaption b { color: var(--wrong); }
figcaption { overflow-wrap: anywhere; } figure.query-thumb { width: 104px; }
.sep { width: 1px; align-self: stretch; background: var(--line); margin: 0 4px; }
.pairs { display: flex; flex-wrap: wrap; gap: 8px; }
.pair { display: flex; gap: 2px; background: #fff; border: 1px solid var(--line); border-radius: 6px;
  padding: 4px; }
.pair .sim { font-size: 12px; align-self: center; padding: 0 4px; font-variant-numeric: tabular-nums; }
svg.map { background: #fff; border: 1px solid var(--line); border-radius: 6px; }
svg.map circle { stroke: #fff; stroke-width: 0.6; cursor: pointer; }
svg.map.focus circle { opacity: 0.25; }
svg.map.focus circle.hl { opacity: 1; stroke: #000; stroke-width: 1.2; }
#tip { position: fixed; z-index: 10; display: none; background: #fff; border: 1px solid #888;
  border-radius: 6px; padding: 6px; box-shadow: 0 2px 8px rgba(0,0,0,.25); font-size: 12px;
  max-width: 360px; }
#tip .frames { display: flex; gap: 3px; margin-top: 4px; } #tip img { width: 64px; height: 64px; }
svg.curve { background: #fff; border: 1px solid var(--line); border-radius: 6px; margin: 4px 0; }
svg text { font: 11px system-ui, sans-serif; fill: #333; }
.legend span { display: inline-block; margin-right: 12px; font-size: 12px; }
.legend i { display: inline-block; width: 14px; height: 3px; vertical-align: middle; margin-right: 4px; }
.blocks > .subject-block { margin-bottom: 8px; }
[hidden] { display: none !important; }
ul.notes { font-size: 13px; color: #333; }
"""

SCRIPT = r"""
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("report-data").textContent);
  function thumb(t) { return D.images[String(t)] || null; }
  function fill(img) {
    var im = thumb(img.getAttribute("data-t"));
    if (im) { img.src = im.mid; return; }
    var box = document.createElement("div");
    box.className = "noimg";
    box.textContent = "no image";
    img.replaceWith(box);
  }
  Array.prototype.forEach.call(document.querySelectorAll("img[data-t]"), fill);

  var picker = document.getElementById("subject");
  function current() { return picker ? picker.value : null; }
  function showSubject() {
    Array.prototype.forEach.call(document.querySelectorAll(".subject-block"), function (b) {
      b.hidden = b.getAttribute("data-subject") !== current();
    });
    filterQueries();
  }

  var search = document.getElementById("q-search");
  var video = document.getElementById("q-video");
  var correct = document.getElementById("q-correct");
  function matches(q) {
    var text = search ? search.value.trim().toLowerCase() : "";
    if (text && q.getAttribute("data-search").indexOf(text) < 0) { return false; }
    if (video && video.value && q.getAttribute("data-video") !== video.value) { return false; }
    var c = correct ? correct.value : "";
    if (c === "top1-right") { return q.getAttribute("data-top1") === "1"; }
    if (c === "top1-wrong") { return q.getAttribute("data-top1") === "0"; }
    if (c === "any-wrong") { return q.getAttribute("data-allright") === "0"; }
    if (c === "all-right") { return q.getAttribute("data-allright") === "1"; }
    return true;
  }
  function filterQueries() {
    var shown = 0, total = 0;
    Array.prototype.forEach.call(document.querySelectorAll("#retrieval .subject-block"), function (b) {
      var active = b.getAttribute("data-subject") === current();
      Array.prototype.forEach.call(b.querySelectorAll(".query"), function (q) {
        var ok = matches(q);
        q.hidden = !ok;
        if (active) { total += 1; if (ok) { shown += 1; } }
      });
    });
    var out = document.getElementById("q-count");
    if (out) { out.textContent = "showing " + shown + " of " + total + " queries"; }
  }
  [search, video, correct].forEach(function (el) {
    if (el) { el.addEventListener("input", filterQueries); el.addEventListener("change", filterQueries); }
  });
  if (picker) { picker.addEventListener("change", showSubject); }

  var tip = document.getElementById("tip");
  function hideTip(svg) {
    tip.style.display = "none";
    if (svg) {
      svg.classList.remove("focus");
      Array.prototype.forEach.call(svg.querySelectorAll("circle.hl"), function (c) {
        c.classList.remove("hl");
      });
    }
  }
  function showTip(ev, circle) {
    var svg = circle.ownerSVGElement;
    var t = circle.getAttribute("data-t");
    var row = D.tracklets[Number(t)] || ["?", "?", "?"];
    while (tip.firstChild) { tip.removeChild(tip.firstChild); }
    var head = document.createElement("div");
    var b = document.createElement("b");
    b.textContent = row[0];
    head.appendChild(b);
    head.appendChild(document.createTextNode(" polyp " + row[2] + ", video " + row[1]));
    tip.appendChild(head);
    var frames = document.createElement("div");
    frames.className = "frames";
    var im = thumb(t);
    (im ? im.frames : []).forEach(function (src) {
      var img = document.createElement("img");
      img.src = src;
      img.alt = "frame of " + row[0];
      frames.appendChild(img);
    });
    if (!im) { frames.textContent = "no image"; }
    tip.appendChild(frames);
    tip.style.display = "block";
    var x = Math.min(ev.clientX + 14, window.innerWidth - tip.offsetWidth - 8);
    var y = Math.min(ev.clientY + 14, window.innerHeight - tip.offsetHeight - 8);
    tip.style.left = x + "px";
    tip.style.top = y + "px";
    svg.classList.add("focus");
    var p = circle.getAttribute("data-p");
    Array.prototype.forEach.call(svg.querySelectorAll("circle"), function (c) {
      c.classList.toggle("hl", c.getAttribute("data-p") === p);
    });
  }
  Array.prototype.forEach.call(document.querySelectorAll("svg.map"), function (svg) {
    svg.addEventListener("mouseover", function (ev) {
      if (ev.target.tagName === "circle") { showTip(ev, ev.target); }
    });
    svg.addEventListener("mouseleave", function () { hideTip(svg); });
  });
  showSubject();
})();
"""
