"""The report page's inline style sheet and its one small script (sortable tables, and the
"scroll sideways" note under boxes whose content is wider than they are).

Both are inlined by `fgscope.report.html.render_page`: the page loads nothing.
"""

from __future__ import annotations

from fgscope.render.style import STYLE

__all__ = ["page_css", "SCRIPT"]


def page_css() -> str:
    """The style sheet, with the stage colours of the figures."""
    return _CSS + _stage_css()


def _stage_css() -> str:
    rules = []
    for stage, colour in STYLE["stage_colors"].items():
        rules.append(f".st-{stage}{{background:{colour}2e}}")
        rules.append(f".dot-{stage}{{color:{colour}}}")
    return "".join(rules)


_CSS = """
:root{color-scheme:light;--fg:#1d1f23;--muted:#5b6170;--line:#d9dce3;--bg:#fff;--soft:#f5f6f8;
--accent:#3b5bdb}
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%;text-size-adjust:100%}
body{margin:0;background:var(--bg);color:var(--fg);line-height:1.5;font-size:16px;
font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,"Noto Sans",
"Liberation Sans",sans-serif}
main,header.top,footer{max-width:72em;margin:0 auto;padding:0 16px}
header.top{padding-top:20px}
h1{font-size:1.6em;margin:0 0 4px;line-height:1.25;overflow-wrap:anywhere}
h2{font-size:1.3em;margin:2em 0 .3em;padding-top:.4em;border-top:1px solid var(--line)}
h3{font-size:1.05em;margin:1.4em 0 .3em;overflow-wrap:anywhere}
.sub{color:var(--muted);margin:0 0 10px}
nav.toc{display:flex;flex-wrap:wrap;gap:6px;margin:10px 0 0}
nav.toc a{padding:3px 10px;border:1px solid var(--line);border-radius:999px;
text-decoration:none;color:var(--fg);background:var(--soft);font-size:.9em}
a{color:var(--accent)}
p.lead{color:var(--muted);margin:.2em 0 1em;max-width:60em}
figure{margin:0 0 1.2em}
.pan{overflow-x:auto;-webkit-overflow-scrolling:touch;max-width:100%}
figure img{display:block;max-width:100%;height:auto;border:1px solid var(--line);
background:#fff}
figcaption{color:var(--muted);font-size:.9em;margin-top:4px}
.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch;border:1px solid var(--line);
margin:0 0 1.2em;max-width:100%}
table{border-collapse:collapse;font-size:.82em;font-variant-numeric:tabular-nums;
width:max-content}
table.sortable{min-width:100%}
.scroll.fit{display:inline-block;max-width:100%;vertical-align:top}
th,td{padding:3px 7px;border-bottom:1px solid var(--line);text-align:right;
white-space:nowrap}
th{background:var(--soft);position:sticky;top:0;font-weight:600}
table.wrap-heads{width:auto}
table.wrap-heads th{white-space:normal;vertical-align:bottom}
td.l,th.l{text-align:left}
td.nm{position:sticky;left:0;background:var(--bg);z-index:1}
th.nm{position:sticky;left:0;z-index:2}
table.sortable th{cursor:pointer;user-select:none}
table.sortable th:hover{background:#e9ebf0}
th[aria-sort=ascending]::after{content:" \\25B2";font-size:.8em}
th[aria-sort=descending]::after{content:" \\25BC";font-size:.8em}
table.kv{font-size:.9em;width:100%;table-layout:fixed}
table.kv th{text-align:left;position:static;width:11em;white-space:normal}
table.kv td{text-align:left;white-space:normal;overflow-wrap:anywhere}
td.bar-cell{text-align:left;min-width:9em}
code,.mono{font-family:ui-monospace,"SFMono-Regular",Menlo,Consolas,"Liberation Mono",
monospace;font-size:.92em}
.bar{display:inline-block;height:.7em;background:var(--accent);opacity:.55;
vertical-align:middle;margin-right:6px;border-radius:2px}
.best{font-weight:700}
.note{background:#fff8e1;border:1px solid #f1d789;border-radius:6px;padding:8px 12px;
margin:1em 0}
.note ul{margin:.2em 0;padding-left:1.2em}
.grid2{display:grid;grid-template-columns:repeat(auto-fill,minmax(280px,1fr));gap:4px 16px}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:0 16px;
align-items:start}
footer{color:var(--muted);padding-top:2em;padding-bottom:2em}
footer p{font-size:.85em;margin:0}
ul.refs{font-size:.9em;padding-left:1.2em}
ul.refs li{margin:.3em 0}
.swipe{display:none;color:var(--muted);font-size:.85em;margin:-1em 0 1.2em}
figure .swipe{margin:2px 0 0}
.overflows+.swipe{display:block}
.bleed th{white-space:normal;vertical-align:bottom}
.bleed td small{display:block;line-height:1.1;color:var(--muted)}
@media (min-width:900px){.scroll.bleed{width:calc(100vw - 48px);max-width:none;
margin-left:calc(50% - 50vw + 24px)}.bleed table{font-size:.75em}.bleed th,.bleed td{padding:3px 4px}}
@media (max-width:600px){body{font-size:15px}h1{font-size:1.3em}
th,td{padding:2px 5px}table.kv th{width:7.5em}.gallery{display:block}}
@media print{nav.toc{display:none}h2{break-after:avoid}figure{break-inside:avoid}}
"""

# No `<` and no `&` inside, so the page stays well-formed XML without CDATA tricks.
SCRIPT = """
(function () {
  function mark() {
    Array.prototype.forEach.call(document.querySelectorAll(".pan, .scroll"), function (box) {
      box.classList.toggle("overflows", box.scrollWidth > box.clientWidth + 1);
    });
  }
  mark();
  window.addEventListener("resize", mark);
  window.addEventListener("load", mark);
  function value(td) {
    var v = td.getAttribute("data-v");
    if (v === null || v === "") return null;
    var n = Number(v);
    return isNaN(n) ? v.toLowerCase() : n;
  }
  function compare(a, b) {
    if (a === b) return 0;
    if (typeof a === typeof b) return a > b ? 1 : -1;
    return typeof a === "number" ? -1 : 1;
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (table) {
    var heads = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(heads, function (th, col) {
      th.tabIndex = 0;
      function sort() {
        var dir = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
        Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", dir === 1 ? "ascending" : "descending");
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (r1, r2) {
          var a = value(r1.cells[col]), b = value(r2.cells[col]);
          if (a === null) return b === null ? 0 : 1;
          if (b === null) return -1;
          return dir * compare(a, b);
        });
        rows.forEach(function (r) { body.appendChild(r); });
      }
      th.addEventListener("click", sort);
      th.addEventListener("keydown", function (e) {
        if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sort(); }
      });
    });
  });
})();
"""
