"""Load a study's MLflow run list in a real browser: ``mlflow ui`` on the store, the URL that the
study prints, headless Chromium (Debian's ``chromium`` package), and the page's text after its
scripts ran. Used by tests/test_mlflow_ui.py and, on the smoke studies' store, by
.ci/smoke-studies:

    python tests/mlflow_ui.py sqlite:///PATH/mlflow.db EXPERIMENT ROW [ROW ...]
"""

from __future__ import annotations

import contextlib
import html
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request


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
        import os
        import signal

        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn worker
        proc.wait(timeout=30)


def page_text(url: str, *, budget_ms: int = 8000) -> str:
    """The text of ``url`` once its scripts ran (``--dump-dom`` after a virtual-time budget)."""
    out = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--window-size=2400,1400",
                          f"--virtual-time-budget={budget_ms}", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120)
    body = out.stdout.split("<body", 1)[-1]
    body = re.sub(r"<(script|style)\b.*?</\1>", " ", body, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", body)))


def run_list_text(uri: str, experiment: str) -> str:
    """The text of ``experiment``'s run list as the printed URL opens it."""
    from uda_ray import tracking

    exp = tracking.mlflow_client(uri).get_experiment_by_name(experiment)
    url = tracking.runs_url(uri, exp.experiment_id)
    with mlflow_ui(uri) as base:
        return page_text(url.replace(tracking.UI_ADDRESS, base))


def main(argv: list[str]) -> int:
    uri, experiment, *rows = argv
    if chromium() is None:
        print("MLflow UI check skipped: no chromium (apt-get install chromium)")
        return 0
    text = run_list_text(uri, experiment)
    missing = [w for w in ["val/mIoU", *(f"Group: {r}" for r in rows)] if w not in text]
    if missing:
        print(f"MLflow UI check FAILED: {missing} not in the run list of {experiment}: {text[:2000]}")
        return 1
    print(f"MLflow UI check passed: the run list of {experiment} shows val/mIoU and the rows {', '.join(rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
