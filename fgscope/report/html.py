"""One self-contained HTML page: escaping, embedded images, inline CSS, a tiny sortable table.

The page loads nothing: images are base64 `data:` URIs, the style sheet and the one small
script are inline, fonts are the system's. The markup is also well-formed XML (void elements
self-closed, only XML's five named entities, a script with no `<` or `&`), so the tests can
parse it strictly. It reads on a laptop and on a phone: one column at most 72 em wide,
images scale down, wide tables scroll sideways inside their own box.
"""

from __future__ import annotations

import base64
import html as _html
import io
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from fgscope.render.style import STYLE

__all__ = [
    "Cell",
    "Section",
    "REFERENCES",
    "esc",
    "inline",
    "cite",
    "png_data_uri",
    "img_html",
    "table_html",
    "references_section",
    "render_page",
]


@dataclass(frozen=True)
class Cell:
    """One table cell.

    Attributes:
        html: the cell's content, already escaped (use `esc` for plain text).
        sort: the value the column sorts by (a number or text); None sorts last.
        cls: CSS class of the cell (e.g. `st-early` colours a stage).
    """

    html: str
    sort: float | str | None = None
    cls: str | None = None


@dataclass(frozen=True)
class Section:
    """One section of the page.

    Attributes:
        id: anchor id (`summary`, `table`, `hierarchy`, ...); tests look sections up by it.
        title: the heading.
        lead: one or two sentences (HTML) saying what the section shows and where the idea
            comes from, with `cite` links to the references.
        body: the section's content (HTML).
    """

    id: str
    title: str
    lead: str
    body: str


REFERENCES: dict[str, tuple[str, str]] = {
    "zeiler2014": (
        "Zeiler &amp; Fergus 2014",
        "M. D. Zeiler, R. Fergus. Visualizing and Understanding Convolutional Networks. "
        "ECCV 2014. arXiv:1311.2901.",
    ),
    "yosinski2014": (
        "Yosinski et al. 2014",
        "J. Yosinski, J. Clune, Y. Bengio, H. Lipson. How transferable are features in deep "
        "neural networks? NeurIPS 2014. arXiv:1411.1792.",
    ),
    "araujo2019": (
        "Araujo et al. 2019",
        "A. Araujo, W. Norris, J. Sim. Computing Receptive Fields of Convolutional Neural "
        "Networks. Distill, 2019. doi:10.23915/distill.00021.",
    ),
    "kornblith2019": (
        "Kornblith et al. 2019",
        "S. Kornblith, M. Norouzi, H. Lee, G. Hinton. Similarity of Neural Network "
        "Representations Revisited. ICML 2019. arXiv:1905.00414.",
    ),
    "nguyen2021": (
        "Nguyen et al. 2021",
        "T. Nguyen, M. Raghu, S. Kornblith. Do Wide and Deep Networks Learn the Same Things? "
        "Uncovering How Neural Network Representations Vary with Width and Depth. ICLR 2021. "
        "arXiv:2010.15327.",
    ),
    "selvaraju2017": (
        "Selvaraju et al. 2017",
        "R. R. Selvaraju, M. Cogswell, A. Das, R. Vedantam, D. Parikh, D. Batra. Grad-CAM: "
        "Visual Explanations from Deep Networks via Gradient-based Localization. ICCV 2017. "
        "arXiv:1610.02391.",
    ),
    "lin2015": (
        "Lin et al. 2015",
        "T.-Y. Lin, A. RoyChowdhury, S. Maji. Bilinear CNN Models for Fine-grained Visual "
        "Recognition. ICCV 2015. arXiv:1504.07889.",
    ),
    "hariharan2015": (
        "Hariharan et al. 2015",
        "B. Hariharan, P. Arbeláez, R. Girshick, J. Malik. Hypercolumns for Object "
        "Segmentation and Fine-grained Localization. CVPR 2015. arXiv:1411.5752.",
    ),
    "alain2016": (
        "Alain &amp; Bengio 2016",
        "G. Alain, Y. Bengio. Understanding intermediate layers using linear classifier "
        "probes. arXiv:1610.01644, 2016 (ICLR 2017 workshop).",
    ),
    "gao2017": (
        "Gao et al. 2017",
        "P. Gao, E. Trautmann, B. Yu, G. Santhanam, S. Ryu, K. Shenoy, S. Ganguli. A theory of "
        "multineuronal dimensionality, dynamics and measurement. bioRxiv 214262, 2017.",
    ),
}


def esc(text: object) -> str:
    """Plain text -> HTML text (quotes escaped too, so it is safe in attributes)."""
    return _html.escape(str(text), quote=True)


def inline(text: str) -> str:
    """Plain text with `code`, **bold** and *italic* marks -> HTML (the rest escaped)."""
    out = esc(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)
    return re.sub(r"(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])", r"<em>\1</em>", out)


def cite(*keys: str) -> str:
    """In-page links to the references, e.g. `(Zeiler & Fergus 2014; Araujo et al. 2019)`."""
    links = [f'<a href="#ref-{k}">{REFERENCES[k][0]}</a>' for k in keys]
    return "(" + "; ".join(links) + ")"


def png_data_uri(source: str | Path | bytes, *, recompress: bool = True) -> tuple[str, int, int]:
    """A PNG file (or PNG/other bytes) as a `data:image/png;base64,...` URI and its size.

    fgscope writes PNGs with fast zlib level 1; re-encoding at level 6 makes them about 10%
    smaller in the page for a sixth of the time of level 9 (which saves 1% more). The smaller
    of the two encodings is embedded; pixels are never changed.

    Returns:
        `(uri, width, height)`.
    """
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        width, height = im.size
        if recompress or im.format != "PNG":
            buf = io.BytesIO()
            im.save(buf, format="PNG", compress_level=6)
            if im.format != "PNG" or buf.tell() < len(data):
                data = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii"), width, height


def img_html(source: str | Path | bytes, alt: str, caption: str | None = None) -> str:
    """A `<figure>` with the embedded image (intrinsic size kept, scaled down to fit).

    A wide figure (more than twice as wide as high: a row of panels) would be unreadably
    small on a phone, so there it keeps a readable width and scrolls sideways in its box.
    """
    uri, w, h = png_data_uri(source)
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    img = f'<img src="{uri}" alt="{esc(alt)}" width="{w}" height="{h}" />'
    if w > 2 * h:
        return (f'<figure class="wide"><div class="pan">{img}</div>'
                f'<p class="swipe">scroll sideways for the whole figure →</p>{cap}</figure>')
    return f"<figure>{img}{cap}</figure>"


def table_html(
    header: Sequence[tuple[str, str]],
    rows: Iterable[Sequence[Cell]],
    *,
    sortable: bool = True,
    cls: str = "",
    fit: bool = False,
) -> str:
    """A table in a horizontally scrolling box.

    Args:
        header: one `(label, tooltip)` per column; the tooltip may be empty.
        rows: cells, one per column.
        sortable: clicking a header sorts by that column (the inline script), numbers as
            numbers, missing values last.
        cls: extra CSS classes of the `<table>`.
        fit: the box is as wide as the table (small tables), not the whole column.
    """
    rows = [list(r) for r in rows]
    classes = " ".join(c for c in ("sortable" if sortable else "", cls) if c)
    # A header is aligned (l) and pinned (nm) like its column's first cell.
    first = [[k for k in (c.cls or "").split() if k in ("l", "nm")] for c in rows[0]] if rows else []
    head = "".join(
        f'<th scope="col"{" class=" + _q(" ".join(first[i])) if i < len(first) and first[i] else ""}'
        f'{" title=" + _q(tip) if tip else ""}>{esc(label)}</th>'
        for i, (label, tip) in enumerate(header)
    )
    body = []
    for row in rows:
        cells = []
        for c in row:
            attrs = ""
            if c.cls:
                attrs += f" class={_q(c.cls)}"
            if sortable:
                attrs += f" data-v={_q('' if c.sort is None else c.sort)}"
            cells.append(f"<td{attrs}>{c.html}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    cls_attr = f" class={_q(classes)}" if classes else ""
    return (
        f'<div class="scroll{" fit" if fit else ""}"><table{cls_attr}><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def _q(value: object) -> str:
    return '"' + esc(value) + '"'


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
.swipe{display:none}
@media (max-width:600px){body{font-size:15px}h1{font-size:1.3em}
th,td{padding:2px 5px}table.kv th{width:7.5em}.gallery{display:block}
figure.wide .pan{overflow-x:auto;-webkit-overflow-scrolling:touch;border:1px solid var(--line)}
figure.wide img{max-width:none;width:760px;border:0}
.swipe{display:block;color:var(--muted);font-size:.85em;margin:2px 0 0}}
@media print{nav.toc{display:none}h2{break-after:avoid}figure{break-inside:avoid}}
"""

# No `<` and no `&` inside, so the page stays well-formed XML without CDATA tricks.
_SCRIPT = """
(function () {
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


def references_section(sections: Sequence[Section]) -> Section | None:
    """The references cited (`cite`) in `sections`, alphabetical; None if none are."""
    text = "".join(s.lead + s.body for s in sections)
    cited = sorted((k for k in REFERENCES if f'href="#ref-{k}"' in text),
                   key=lambda k: REFERENCES[k][0])
    if not cited:
        return None
    items = "".join(f'<li id="ref-{k}">{REFERENCES[k][1]}</li>' for k in cited)
    return Section(
        "references", "References", "Where the ideas behind each section come from.",
        f'<ul class="refs">{items}</ul>',
    )


def render_page(
    title: str,
    subtitle: str,
    sections: Sequence[Section],
    *,
    notes: Sequence[str] = (),
    footer: str = "",
) -> str:
    """The whole page as one string.

    Args:
        title: page title (plain text).
        subtitle: one line under the title (HTML).
        sections: in page order (append `references_section(sections)` to list the sources)
        notes: what is not in the page and why (plain text with `code` marks, one item each),
            shown near the top.
        footer: a line at the bottom (HTML).
    """
    all_sections = list(sections)
    toc = "".join(f'<a href="#{s.id}">{esc(s.title)}</a>' for s in all_sections)
    note_html = ""
    if notes:
        items = "".join(f"<li>{inline(n)}</li>" for n in notes)
        note_html = f'<div class="note" id="notes"><strong>Not in this report:</strong><ul>{items}</ul></div>'
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8" />',
        '<meta name="viewport" content="width=device-width, initial-scale=1" />',
        '<meta name="generator" content="fgscope" />',
        f"<title>{esc(title)}</title>",
        f"<style>{_CSS}{_stage_css()}</style></head><body>",
        f'<header class="top"><h1>{esc(title)}</h1><p class="sub">{subtitle}</p>',
        f'<nav class="toc" aria-label="sections">{toc}</nav>{note_html}</header><main>',
    ]
    for s in all_sections:
        parts.append(
            f'<section id="{esc(s.id)}"><h2>{esc(s.title)}</h2>'
            f'<p class="lead">{s.lead}</p>{s.body}</section>'
        )
    parts.append(f"</main><footer><p>{footer}</p></footer><script>{_SCRIPT}</script></body></html>\n")
    return "\n".join(parts)
