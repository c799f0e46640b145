"""report.html in a real browser: headless Chromium opens it from disk (file://).

Chromium is driven through the DevTools protocol over a pipe (`--remote-debugging-pipe`:
NUL-separated JSON on file descriptors 3 and 4), so no driver, port or Python package is
needed. Checks: no console errors or uncaught exceptions, no request other than the file
itself and data: URIs, every image decoded (naturalWidth > 0), no sideways scrolling on a
phone, the table sorts; every figure's smallest text is at least 8 CSS px high as rendered
(its rendered scale times the pixel font size the PNG records), every column of every
table can be scrolled into view (and a note says so where a box scrolls); screenshots at
laptop (1280x800) and phone (390x844) widths.

Chromium comes from Debian's `chromium` package (`make test` installs it). Without it the
tests skip locally and FAIL when the environment variable CI is set. Set
FGSCOPE_SCREENSHOTS=DIR to keep the screenshots (docs/gallery.md uses them).
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

CHROMIUM_FLAGS = [
    "--headless",
    "--remote-debugging-pipe",
    "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--no-first-run",
    "--no-default-browser-check",
    "--hide-scrollbars",
    "--mute-audio",
]
LAPTOP = (1280, 800)
PHONE = (390, 844)


def _chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Chromium:
    """A headless Chromium driven over the DevTools pipe; use as a context manager."""

    def __init__(self, binary: str, timeout: float = 60.0) -> None:
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []
        self._buf = b""
        self._id = 0
        self._profile = tempfile.mkdtemp(prefix="fgscope-chromium-")
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def wire() -> None:  # in the child: the protocol wants its pipes on fds 3 and 4
            a, b = os.dup(to_chrome_r), os.dup(from_chrome_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={self._profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
            pass_fds=(3, 4), preexec_fn=wire,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.call("Browser.close", timeout=10)
                self.proc.wait(10)
        except Exception:
            pass
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
            for fd in (self._to_chrome, self._from_chrome):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._log.close()
            shutil.rmtree(self._profile, ignore_errors=True)

    def stderr_tail(self) -> str:
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")[-2000:]

    def _recv(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self._from_chrome], [], [], max(0.0, left))
            if not ready:
                raise TimeoutError(f"no answer from Chromium; its log ends with:\n{self.stderr_tail()}")
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium closed the pipe; its log ends with:\n{self.stderr_tail()}")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float | None = None) -> dict[str, Any]:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            reply = self._recv(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, session: str) -> None:
        deadline = time.monotonic() + self.timeout
        while not any(e.get("method") == method and e.get("sessionId") == session for e in self.events):
            self.events.append(self._recv(deadline))

    def open(self, url: str, size: tuple[int, int], mobile: bool) -> Page:
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable", session=session)
        self.call("Emulation.setDeviceMetricsOverride", {
            "width": size[0], "height": size[1], "deviceScaleFactor": 1, "mobile": mobile,
        }, session)
        self.call("Page.navigate", {"url": url}, session)
        self.wait_for("Page.loadEventFired", session)
        return Page(self, session)


class Page:
    """One open tab."""

    def __init__(self, browser: Chromium, session: str) -> None:
        self.browser, self.session = browser, session

    def eval(self, expression: str) -> Any:
        res = self.browser.call("Runtime.evaluate", {
            "expression": expression, "returnByValue": True, "awaitPromise": True,
        }, self.session)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expression}: {res['exceptionDetails']}")
        return res["result"].get("value")

    def screenshot(self, path: Path) -> Path:
        data = self.browser.call("Page.captureScreenshot", {"format": "png"}, self.session)["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def events(self) -> list[dict[str, Any]]:
        return [e for e in self.browser.events if e.get("sessionId") == self.session]

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and failed loads, one line each."""
        out = []
        for e in self.events():
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in p.get("args", [])))
            elif m == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                out.append("exception: " + str(d.get("exception", {}).get("description", d.get("text"))))
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.append("log: " + str(p["entry"].get("text")) + " " + str(p["entry"].get("url", "")))
            elif m == "Network.loadingFailed":
                out.append("load failed: " + str(p.get("errorText")))
        return out

    def requests(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events()
                if e.get("method") == "Network.requestWillBeSent"]


@pytest.fixture(scope="module")
def chromium() -> Iterator[str]:
    binary = _chromium_binary()
    if binary is None:
        msg = ("Chromium is not installed (Debian: apt-get install chromium chromium-driver; "
               "`make test` does it)")
        if os.environ.get("CI"):
            pytest.fail(msg + "; CI is set, so this is a failure, not a skip")
        pytest.skip(msg)
    yield binary


@pytest.fixture(scope="module")
def report_html(tmp_path_factory) -> Path:
    """A live report of a small random-init ResNet-18 on ten tiny images (enough for the
    columns that need the most images, debiased CKA and the participation ratio across
    images: the widest table)."""
    return ten_image_report(tmp_path_factory.mktemp("browser"))


def ten_image_report(root: Path) -> Path:
    """report.html of a random-init ResNet-18 (seeded) on ten 48x40 noise images in `root`."""
    import numpy as np
    import torch

    from fgscope.report.run import ReportConfig, run_report

    rng = np.random.default_rng(0)
    paths = []
    for i in range(10):
        p = root / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    torch.manual_seed(0)  # the random init, so the page is the same on every run
    _, res = run_report(ReportConfig(
        model="resnet18", images=paths, out=root / "report", formats=("png",),
        model_kwargs={"weights": None, "size": 64}, device="cpu",
    ))
    return res.html


def _keep(path: Path) -> None:
    keep = os.environ.get("FGSCOPE_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / path.name)


@pytest.mark.parametrize("name,size,mobile", [("laptop", LAPTOP, False), ("phone", PHONE, True)])
def test_report_opens_cleanly(chromium, report_html, tmp_path, name, size, mobile):
    with Chromium(chromium) as browser:
        page = browser.open(report_html.resolve().as_uri(), size, mobile)
        assert page.errors() == []
        # Self-contained: the browser asked for the page itself and data: URIs, nothing else.
        others = [u for u in page.requests() if not u.startswith("data:") and u != report_html.resolve().as_uri()]
        assert others == []
        images = page.eval("Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.alt])")
        assert len(images) >= 3
        assert [alt for ok, w, alt in images if not (ok and w > 0)] == []
        assert page.eval("innerWidth") == size[0]
        # Nothing makes the page scroll sideways: wide tables scroll inside their own box.
        assert page.eval("document.documentElement.scrollWidth") <= size[0]
        shot = page.screenshot(tmp_path / f"report_{name}.png")
    with Image.open(shot) as im:
        assert im.size == size and im.getextrema() != ((255, 255),) * 3
    _keep(shot)


def test_table_sorts_by_clicked_column(chromium, report_html):
    with Chromium(chromium) as browser:
        page = browser.open(report_html.resolve().as_uri(), LAPTOP, False)
        col = "Array.from(document.querySelectorAll('#table thead th')).findIndex(t => t.textContent === 'rf (px)')"
        values = (f"Array.from(document.querySelectorAll('#table tbody tr')).map(r => "
                  f"r.cells[{col}].getAttribute('data-v')).filter(v => v !== '').map(Number)")
        before = page.eval(values)
        page.eval(f"document.querySelectorAll('#table thead th')[{col}].click()")
        up = page.eval(values)
        page.eval(f"document.querySelectorAll('#table thead th')[{col}].click()")
        down = page.eval(values)
        assert sorted(before) == up and sorted(before, reverse=True) == down
        assert page.errors() == []


# Per image: [alt, rendered width, natural width, the PNG's smallest text in px (or null)].
_FIGURES = ("Array.from(document.querySelectorAll('figure img')).map(i => [i.alt, "
            "i.getBoundingClientRect().width, i.naturalWidth, "
            "i.dataset.textPx ? Number(i.dataset.textPx) : null])")


@pytest.mark.parametrize("name,size,mobile", [("laptop", LAPTOP, False), ("phone", PHONE, True)])
def test_figure_text_is_readable(chromium, report_html, tmp_path, name, size, mobile):
    """Scaled to fit the page, no figure's smallest text falls under 8 CSS px."""
    with Chromium(chromium) as browser:
        page = browser.open(report_html.resolve().as_uri(), size, mobile)
        figures = page.eval(_FIGURES)
        assert len(figures) >= 5  # hierarchy, geometry, grids, Grad-CAM, similarity
        small = []
        for alt, shown, natural, text_px in figures:
            assert text_px is not None, f"{alt}: no recorded text size"
            css_px = shown / natural * text_px
            if css_px < 8.0:
                small.append(f"{alt}: {css_px:.1f} px")
        assert small == [], small
        # What does not fit scrolls inside its box, never the page, and says so.
        assert page.eval("document.documentElement.scrollWidth") <= size[0]
        hidden_notes = page.eval(
            "Array.from(document.querySelectorAll('.pan.overflows, .scroll.overflows')).filter("
            "b => getComputedStyle(b.nextElementSibling).display === 'none').length")
        assert hidden_notes == 0
        page.eval("location.hash = 'hierarchy'; new Promise(r => requestAnimationFrame("
                  "() => requestAnimationFrame(r)))")
        _keep(page.screenshot(tmp_path / f"report_{name}_readable.png"))


@pytest.mark.parametrize("name,size,mobile", [("laptop", LAPTOP, False), ("phone", PHONE, True)])
def test_every_table_column_can_be_reached(chromium, report_html, tmp_path, name, size, mobile):
    """Each header can be scrolled into view inside its box, clear of the pinned name column."""
    js = """(() => {
      const out = [];
      document.querySelectorAll('.scroll table').forEach((table, t) => {
        const box = table.closest('.scroll');
        const heads = Array.from(table.tHead ? table.tHead.rows[0].cells : []);
        const pinned = heads.find(h => h.classList.contains('nm'));
        heads.forEach(th => {
          box.scrollLeft = 0;
          const cover = pinned && th !== pinned ? pinned.getBoundingClientRect().width : 0;
          const x = th.getBoundingClientRect().left - box.getBoundingClientRect().left;
          box.scrollLeft = Math.max(0, Math.floor(x - cover));  // scrollLeft is whole pixels
          const r = th.getBoundingClientRect(), b = box.getBoundingClientRect();
          const p = pinned ? pinned.getBoundingClientRect() : null;
          const clear = !p || th === pinned || r.left >= p.right - 1 || r.right <= p.left + 1;
          const ok = r.width > 0 && r.left >= Math.max(0, b.left) - 1 &&
            r.right <= Math.min(innerWidth, b.right) + 1 && clear;
          if (!ok) out.push(t + ':' + th.textContent);
        });
        box.scrollLeft = 0;
      });
      return out;
    })()"""
    with Chromium(chromium) as browser:
        page = browser.open(report_html.resolve().as_uri(), size, mobile)
        assert page.eval("document.querySelectorAll('.scroll table').length") >= 4
        assert page.eval(js) == []
        heads = page.eval("Array.from(document.querySelectorAll('#table thead th')).map(t => t.textContent)")
        assert {"max", "abstraction"} <= set(heads) and len(heads) >= 15, heads  # the right end
        page.eval("location.hash = 'table'; new Promise(r => requestAnimationFrame("
                  "() => requestAnimationFrame(r)))")
        _keep(page.screenshot(tmp_path / f"report_{name}_columns.png"))


def test_harness_sees_errors_and_broken_images(chromium, tmp_path):
    """The checks above can fail: a console error, an exception and a broken image are seen."""
    bad = tmp_path / "bad.html"
    bad.write_text(
        '<!DOCTYPE html><html><body><img src="missing.png" alt="x"/>'
        "<script>console.error('boom'); null.x;</script></body></html>"
    )
    with Chromium(chromium) as browser:
        page = browser.open(bad.as_uri(), PHONE, True)
        errors = page.errors()
        assert any("boom" in e for e in errors)
        assert any(e.startswith("exception") for e in errors)
        assert page.eval("document.images[0].naturalWidth") == 0
        assert any(u.endswith("missing.png") for u in page.requests())


def screenshots(html: Path, out: Path, anchors: tuple[str, ...] = ("", "table", "hierarchy")) -> list[Path]:
    """Laptop and phone screenshots of `html`, at the top and scrolled to each anchor."""
    binary = _chromium_binary()
    if binary is None:
        raise SystemExit("chromium is not installed")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, size, mobile in (("laptop", LAPTOP, False), ("phone", PHONE, True)):
        with Chromium(binary) as browser:
            page = browser.open(Path(html).resolve().as_uri(), size, mobile)
            if page.errors():
                raise SystemExit(f"{html}: {page.errors()}")
            for anchor in anchors:
                page.eval(f"location.hash = '{anchor}'; new Promise(r => requestAnimationFrame("
                          "() => requestAnimationFrame(r)))")
                path = out / f"report_{name}{'_' + anchor if anchor else ''}.png"
                written.append(page.screenshot(path))
    return written


if __name__ == "__main__":  # python tests/test_report_browser.py REPORT.html OUT_DIR [ANCHOR...]
    import sys

    for p in screenshots(Path(sys.argv[1]), Path(sys.argv[2]), tuple(["", *sys.argv[3:]])):
        print(p, f"{p.stat().st_size / 1024:.0f} kB")
