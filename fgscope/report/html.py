"""One self-contained HTML page: escaping, embedded images, inline CSS, a tiny sortable table.

The page loads nothing: images are base64 `data:` URIs, the style sheet and the one small
script are inline, fonts are the system's. The markup is also well-formed XML (void elements
self-closed, only XML's five named entities, a script with no `<` or `&`), so the tests can
parse it strictly. It reads on a laptop and on a phone: one column at most 72 em wide (the
abstraction table may use the window's width), images scale down but never below the size
at which their smallest text is `READABLE_PX` CSS px high, and what is still too wide
scrolls sideways inside its own box, with a note under the box saying so.
"""

from __future__ import annotations

import base64
import html as _html
import io
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from fgscope.render.grid import TEXT_PX_KEY
from fgscope.report.assets import SCRIPT, page_css

__all__ = [
    "Cell",
    "Section",
    "REFERENCES",
    "esc",
    "inline",
    "cite",
    "png_data_uri",
    "img_html",
    "text_px",
    "READABLE_PX",
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
    "bau2017": (
        "Bau et al. 2017",
        "D. Bau, B. Zhou, A. Khosla, A. Oliva, A. Torralba. Network Dissection: Quantifying "
        "Interpretability of Deep Visual Representations. CVPR 2017. arXiv:1704.05796.",
    ),
    "morcos2018": (
        "Morcos et al. 2018",
        "A. S. Morcos, D. G. T. Barrett, N. C. Rabinowitz, M. Botvinick. On the importance of "
        "single directions for generalization. ICLR 2018. arXiv:1803.06959.",
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


READABLE_PX = 8.0
"""The smallest text height (CSS px) a figure may be shown at, on a phone as on a laptop."""
_UNKNOWN_TEXT_PX = 11.0  # a PNG without a record (older runs): fgscope's smallest label size


def text_px(data: bytes) -> float:
    """The size in pixels of the smallest text in a PNG fgscope wrote (its `TEXT_PX_KEY`
    chunk; 11 px, fgscope's smallest label, for a picture without one)."""
    with Image.open(io.BytesIO(data)) as im:
        raw = getattr(im, "text", {}).get(TEXT_PX_KEY) if im.format == "PNG" else None
    try:
        return float(raw) if raw else _UNKNOWN_TEXT_PX
    except ValueError:
        return _UNKNOWN_TEXT_PX


def img_html(source: str | Path | bytes, alt: str, caption: str | None = None) -> str:
    """A `<figure>` with the embedded image: intrinsic size kept, scaled down to fit, but
    never so far that its smallest text falls under `READABLE_PX` CSS px (from the size
    the PNG records, `text_px`). A figure that would have to shrink further keeps that
    width and scrolls sideways in its box (the page says so where it happens)."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    px = text_px(data)
    uri, w, h = png_data_uri(data)
    min_w = min(2 * w, math.ceil(w * (READABLE_PX + 0.25) / px))
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    img = (f'<img src="{uri}" alt="{esc(alt)}" width="{w}" height="{h}" '
           f'style="min-width:{min_w}px" data-text-px="{px:g}" />')
    return f'<figure><div class="pan">{img}</div>{_SWIPE}{cap}</figure>'


_SWIPE = '<p class="swipe">scroll sideways for the rest →</p>'


def table_html(
    header: Sequence[tuple[str, str]],
    rows: Iterable[Sequence[Cell]],
    *,
    sortable: bool = True,
    cls: str = "",
    fit: bool = False,
    bleed: bool = False,
) -> str:
    """A table in a horizontally scrolling box (a note appears under it when it scrolls).

    Args:
        header: one `(label, tooltip)` per column; the tooltip may be empty. Labels break
            after `_` and `/` when the header row needs the room.
        rows: cells, one per column.
        sortable: clicking a header sorts by that column (the inline script), numbers as
            numbers, missing values last.
        cls: extra CSS classes of the `<table>`.
        fit: the box is as wide as the table (small tables), not the whole column.
        bleed: on a wide screen the box may use the window's whole width, not only the
            text column's (the abstraction table).
    """
    rows = [list(r) for r in rows]
    classes = " ".join(c for c in ("sortable" if sortable else "", cls) if c)
    # A header is aligned (l) and pinned (nm) like its column's first cell.
    first = [[k for k in (c.cls or "").split() if k in ("l", "nm")] for c in rows[0]] if rows else []
    head = "".join(
        f'<th scope="col"{" class=" + _q(" ".join(first[i])) if i < len(first) and first[i] else ""}'
        f'{" title=" + _q(tip) if tip else ""}>{_breakable(label)}</th>'
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
    box = "scroll" + (" fit" if fit else "") + (" bleed" if bleed else "")
    return (
        f'<div class="{box}"><table{cls_attr}><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>{_SWIPE}"
    )


def _breakable(label: str) -> str:
    """A header label that may break after `_` and `/` (`negative_<wbr />frac`)."""
    return re.sub(r"([_/])", r"\1<wbr />", esc(label))


def _q(value: object) -> str:
    return '"' + esc(value) + '"'


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
        f"<style>{page_css()}</style></head><body>",
        f'<header class="top"><h1>{esc(title)}</h1><p class="sub">{subtitle}</p>',
        f'<nav class="toc" aria-label="sections">{toc}</nav>{note_html}</header><main>',
    ]
    for s in all_sections:
        parts.append(
            f'<section id="{esc(s.id)}"><h2>{esc(s.title)}</h2>'
            f'<p class="lead">{s.lead}</p>{s.body}</section>'
        )
    parts.append(f"</main><footer><p>{footer}</p></footer><script>{SCRIPT}</script></body></html>\n")
    return "\n".join(parts)
