"""Load a study's MLflow run list in a real browser: ``mlflow ui`` on the store, the URL that the
study prints, headless Chromium (Debian's ``chromium`` package) driven over the DevTools protocol
on a pipe (``--remote-debugging-pipe``: no websocket client needed), with a fresh profile, as on
a first visit (MLflow 3.17 then opens its Assistant panel beside the page). Used by
tests/test_mlflow_ui.py and, on the smoke studies' store, by .ci/smoke-studies:

    python tests/mlflow_ui.py sqlite:///PATH/mlflow.db EXPERIMENT ROW [ROW ...]

which checks the run list's text (val/mIoU, a group per row) and that the ``val/mIoU`` and
``sel/mIoU`` columns are on screen at the laptop sizes :data:`LAPTOPS`, Assistant panel open.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

LAPTOPS = ((1280, 800), (1600, 1000))  # (width, height): the run list must show its metrics at these
METRIC_COLUMNS = ("metrics.`val/mIoU`", "metrics.`sel/mIoU`")  # the grid's column ids


def chromium() -> str | None:
    """The Chromium executable, None when it is not installed."""
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_ui(uri: str, *, timeout: float = 120):
    """``mlflow ui --workers 1`` on ``uri`` at a free port; yields its base URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--workers", "1",
                             "--host", "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"mlflow ui on {uri} did not start") from None
                time.sleep(0.5)
        yield base
    finally:
        import signal

        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn worker
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=1)
        with contextlib.suppress(ProcessLookupError):  # after pages that polled it, a graceful stop takes ~10 s
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


# The run table's columns as laid out on screen: for each header cell (by its column id), the
# share of its width inside the grid's visible part (pinned columns, or the scrolled part) and
# inside the window; and whether MLflow's Assistant panel is open.
_COLUMNS_JS = r"""(() => {
  const grid = document.querySelector('.ag-root-wrapper');
  const center = document.querySelector('.ag-header-viewport');
  const pinned = document.querySelector('.ag-pinned-left-header');
  const cols = {};
  for (const cell of document.querySelectorAll('.ag-header-cell[col-id]')) {
    const r = cell.getBoundingClientRect();
    const box = (cell.closest('.ag-pinned-left-header') ? pinned : center).getBoundingClientRect();
    const right = Math.min(r.right, box.right, grid.getBoundingClientRect().right, window.innerWidth);
    const shown = Math.max(0, right - Math.max(r.left, box.left, 0));
    cols[cell.getAttribute('col-id')] = {left: Math.round(r.left), width: Math.round(r.width),
                                          visible: r.width ? Math.round(100 * shown / r.width) / 100 : 0};
  }
  return JSON.stringify({cols, width: window.innerWidth, height: window.innerHeight,
                         assistant: document.body.innerText.includes('MLflow Assistant')});
})()"""


class Browser:
    """One headless Chromium with a fresh profile, driven over the DevTools protocol on a pipe."""

    def __init__(self, *, timeout: float = 60):
        self.timeout = timeout
        self._profile = tempfile.TemporaryDirectory(prefix="uda-ray-chromium-")
        to_chrome, self._to_chrome = os.pipe()     # we write commands; Chromium reads them on fd 3
        self._from_chrome, from_chrome = os.pipe()  # Chromium writes replies on fd 4

        def fds():  # in the child: the pipe ends as fds 3 and 4, which Chromium's protocol pipe uses
            a, b = fcntl.fcntl(to_chrome, fcntl.F_DUPFD, 10), fcntl.fcntl(from_chrome, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                      "--remote-debugging-pipe", f"--user-data-dir={self._profile.name}",
                                      "--window-size=1600,1000", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=fds,
                                     close_fds=False, start_new_session=True)
        os.close(to_chrome)
        os.close(from_chrome)
        self._id, self._buf, self.session = 0, b"", None
        page = next(t for t in self.send("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self.send("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]

    def send(self, method: str, **params) -> dict:
        """A DevTools command (on the page once attached); its result. Events are dropped."""
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if self.session:
            msg["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + self.timeout
        while True:
            while b"\0" not in self._buf:
                if not select.select([self._from_chrome], [], [], max(0.0, deadline - time.time()))[0]:
                    raise TimeoutError(f"chromium: no reply to {method} in {self.timeout} s")
                chunk = os.read(self._from_chrome, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium ended during {method}")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"chromium: {method}: {reply['error']}")
                return reply["result"]

    def evaluate(self, js: str):
        """The value of a JavaScript expression in the page."""
        res = self.send("Runtime.evaluate", expression=js, returnByValue=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"javascript: {res['exceptionDetails']}")
        return res["result"].get("value")

    def open(self, url: str, *, size: tuple[int, int] = (2400, 1400), ready: str = "", settle: float = 0.5,
             fresh: bool = True) -> None:
        """Load ``url`` in a window of ``size`` and wait until the JavaScript condition ``ready``
        holds (by default: the run table shows its rows), then ``settle`` seconds more. Not
        ``fresh``: the page's own move to ``url`` (another view or tab of the run list: quicker,
        the scripts stay loaded), so ``ready`` must tell the new state from the old."""
        w, h = size
        self.send("Emulation.setDeviceMetricsOverride", width=w, height=h, deviceScaleFactor=1, mobile=False)
        if fresh:
            self.send("Page.navigate", url="about:blank")  # then a load of the page, not a jump within it
        self.send("Page.navigate", url=url)
        ready = ready or "document.querySelectorAll('.ag-center-cols-container [role=row]').length > 0"
        deadline = time.time() + self.timeout
        while True:
            with contextlib.suppress(RuntimeError):  # the page's context may still be replaced
                if self.evaluate(f"location.href !== 'about:blank' && !!({ready})"):
                    break
            if time.time() > deadline:
                raise TimeoutError(f"{url}: not ready ({ready}) after {self.timeout} s: {self.text()[:2000]}")
            time.sleep(0.25)
        time.sleep(settle)

    def text(self) -> str:
        """The page's text, whitespace collapsed."""
        return re.sub(r"\s+", " ", self.evaluate("document.body ? document.body.innerText : ''") or "")

    def columns(self) -> dict:
        """The run table's columns on screen (:data:`_COLUMNS_JS`)."""
        return json.loads(self.evaluate(_COLUMNS_JS))

    def screenshot(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))
        return path

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.send("Browser.close")
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)
        self._profile.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def page_text(url: str, *, size: tuple[int, int] = (2400, 1400)) -> str:
    """The text of the run list at ``url`` once its rows are shown."""
    with Browser() as b:
        b.open(url, size=size)
        return b.text()


def run_list_url(uri: str, experiment: str, base: str, **kw) -> str:
    """The URL the study prints for ``experiment``'s run list, on the UI at ``base``."""
    from uda_ray import tracking

    exp = tracking.mlflow_client(uri).get_experiment_by_name(experiment)
    return tracking.runs_url(uri, exp.experiment_id, **kw).replace(tracking.UI_ADDRESS, base)


def run_list_text(uri: str, experiment: str) -> str:
    """The text of ``experiment``'s run list as the printed URL opens it."""
    with mlflow_ui(uri) as base:
        return page_text(run_list_url(uri, experiment, base))


def laptop_layouts(browser: Browser, url: str, *, shots: str | Path | None = None) -> dict:
    """{(width, height): the run table's columns on screen (:meth:`Browser.columns`) and the page's
    ``text``} for each of :data:`LAPTOPS`, each a fresh load of ``url``; a screenshot of each into
    ``shots``."""
    out = {}
    for w, h in LAPTOPS:
        browser.open(url, size=(w, h))
        out[(w, h)] = {**browser.columns(), "text": browser.text()}
        if shots:
            browser.screenshot(Path(shots) / f"run_list_{w}x{h}.png")
    return out


def hidden_metrics(layout: dict) -> list[str]:
    """The metric columns (:data:`METRIC_COLUMNS`) not wholly on screen in ``layout``."""
    return [c for c in METRIC_COLUMNS if layout["cols"].get(c, {}).get("visible", 0) < 1]


def main(argv: list[str]) -> int:
    uri, experiment, *rows = argv
    if chromium() is None:
        print("MLflow UI check skipped: no chromium (apt-get install chromium)")
        return 0
    with mlflow_ui(uri) as base, Browser() as browser:
        layouts = laptop_layouts(browser, run_list_url(uri, experiment, base))
    text = layouts[LAPTOPS[-1]]["text"]
    hidden = {size: hidden_metrics(layout) for size, layout in layouts.items()}
    missing = [w for w in ["val/mIoU", *(f"Group: {r}" for r in rows)] if w not in text]
    if missing:
        print(f"MLflow UI check FAILED: {missing} not in the run list of {experiment}: {text[:2000]}")
        return 1
    cut = {f"{w}x{h}": c for (w, h), c in hidden.items() if c}
    if cut:
        print(f"MLflow UI check FAILED: the run list of {experiment} does not show these columns: {cut}")
        return 1
    print(f"MLflow UI check passed: the run list of {experiment} shows val/mIoU and the rows {', '.join(rows)}, "
          f"and val/mIoU and sel/mIoU at {', '.join(f'{w}x{h}' for w, h in LAPTOPS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
