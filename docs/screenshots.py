"""Screenshots for docs/screenshots.md, taken in a real headless browser (Debian's chromium).

    python docs/screenshots.py [--work DIR] [--out docs/img] [--port 5077] [--keep]

1. Trains a tiny real scaling study (``pipelines.scaling run``): a 2-stage AU-Net and a 1-stage
   byte-level baseline at three compute budgets, on the shipped quickstart corpus, into the
   default store ``<work>/mlflow.db``. A few minutes on 2 CPU cores.
2. Writes the study's report (``pipelines.scaling report``: pipelines/report.py).
3. Starts ``mlflow server`` on 127.0.0.1 (its own port) on that store, opens MLflow's compare-runs
   page for the AU-Net and the baseline at the largest budget, with the scatter plot set to
   val/bits_per_byte against val/flops, and screenshots it; then the report page. Chromium is
   driven over its DevTools protocol (``websockets``), so the page's JavaScript has rendered and
   the plot's axes can be picked before each capture. The server and chromium are stopped by pid.

Needs ``apt-get install -y chromium``. The PNGs land in ``--out``; look at them.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "experiments" / "data" / "quickstart.jsonl.gz"
STUDY = "tiny"
EXPERIMENT = "screenshots"


def study_spec(work: Path) -> dict:
    """The tiny study: AU-Net 2 (bytes -> words) against a byte-level Transformer."""
    return {
        "name": "screenshots",
        "data": {
            "sources": [{"path": str(CORPUS)}],
            "seq_len": 64,
            "val_fraction": 0.25,
            "max_documents": 80,
        },
        "model": {
            "dimensions": [16, 32],
            "layers": [1, 1],
            "head_dims": [16, 16],
            "max_seqlens": [64, 16],
            "sliding_windows": [32, 32],
            "multiple_of": 16,
            "strategy": {"word1": "1@1"},
        },
        "train": {"eval_batches": 2, "log_every": 1, "progress_every": 1000},
        "tracking": {"experiment": EXPERIMENT},  # the default store: <work>/mlflow.db
        "resources": {"num_workers": 1, "storage_path": str(work / "out"), "max_failures": 0},
        "study": {
            "name": STUDY,
            "budgets": [4e8, 1e9, 2.5e9],
            "bytes_per_param": 20,
            "evals_per_run": 6,
            "fit": {"bootstrap": 50},
            "sweep": {"max_concurrent_trials": 2, "flop_tolerance": 0.1},
            "variants": {
                "aunet2": {},
                "baseline": {
                    "model.dimensions": [32],
                    "model.layers": [2],
                    "model.head_dims": [16],
                    "model.max_seqlens": None,
                    "model.sliding_windows": [32],
                    "model.strategy": {},
                },
            },
        },
    }


def run(cmd: list[str], cwd: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(REPO)
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, cwd=cwd, env=env, check=True)


def train_and_report(work: Path) -> Path:
    """The study's runs in ``<work>/mlflow.db`` and its report; the report's HTML file."""
    path = work / "study.yaml"
    path.write_text(yaml.safe_dump(study_spec(work), sort_keys=False))
    run([sys.executable, "-m", "pipelines.scaling", "run", str(path)], work)
    out = work / "report"
    run([sys.executable, "-m", "pipelines.scaling", "report", str(path), "--out", str(out)], work)
    return out / "report.html"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, seconds: float) -> None:
    deadline = time.time() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            if time.time() > deadline:
                raise
        time.sleep(0.5)


class Browser:
    """One headless chromium page over the DevTools protocol: navigate, wait for text, click
    like a user (real mouse events at an element's centre), capture a PNG."""

    def __init__(self, ws) -> None:
        self.ws, self.n = ws, 0

    async def call(self, method: str, **params) -> dict:
        self.n += 1
        await self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(await self.ws.recv())
            if msg.get("id") == self.n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    async def js(self, expr: str):
        out = await self.call("Runtime.evaluate", expression=expr, returnByValue=True)
        return out.get("result", {}).get("value")

    async def goto(self, url: str, width: int, height: int) -> None:
        await self.call(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        await self.call("Page.navigate", url=url)

    async def wait_for(self, expr: str, seconds: float = 60.0) -> None:
        deadline = time.time() + seconds
        while not await self.js(f"!!({expr})"):
            if time.time() > deadline:
                text = await self.js("document.body ? document.body.innerText.slice(0, 500) : ''")
                raise TimeoutError(f"waited {seconds:.0f} s for {expr}; page: {text!r}")
            await asyncio.sleep(0.5)

    async def click(self, find: str) -> None:
        """Click the element the JS expression ``find`` returns (scrolled into view)."""
        rect = await self.js(
            f"(() => {{ const e = {find}; if (!e) return null;"
            " e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
            " return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        if rect is None:
            raise LookupError(f"nothing to click: {find}")
        x, y = rect
        await self.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        for kind in ("mousePressed", "mouseReleased"):
            await self.call(
                "Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1
            )
        await asyncio.sleep(0.7)

    async def png(self, path: Path, full_page: bool = False) -> None:
        params: dict = {"format": "png"}
        if full_page:
            size = await self.js(
                "[document.documentElement.scrollWidth, document.documentElement.scrollHeight]"
            )
            params |= {
                "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": size[0], "height": size[1], "scale": 1},
            }
        data = (await self.call("Page.captureScreenshot", **params))["data"]
        path.write_bytes(base64.b64decode(data))
        print(f"wrote {path}", file=sys.stderr)


def by_text(selector: str, text: str) -> str:
    """JS: the last element matching ``selector`` whose own text is exactly ``text``."""
    return (
        f"[...document.querySelectorAll({json.dumps(selector)})]"
        f".filter(e => e.innerText && e.innerText.trim() === {json.dumps(text)}).pop()"
    )


def has_text(text: str) -> str:
    return f"document.body && document.body.innerText.includes({json.dumps(text)})"


async def shoot(
    devtools: int, mlflow_url: str, exp_id: str, runs: list[str], report: Path, out: Path
) -> None:
    import websockets

    with urllib.request.urlopen(f"http://127.0.0.1:{devtools}/json/list", timeout=10) as r:
        page = next(t for t in json.load(r) if t["type"] == "page")
    async with websockets.connect(page["webSocketDebuggerUrl"], max_size=2**28) as ws:
        b = Browser(ws)
        await b.call("Page.enable")
        # 1. MLflow's compare-runs page: the two runs side by side, then its scatter plot of
        #    the latest val/bits_per_byte against the latest val/flops (one point per run).
        q = "runs={}&experiments={}".format(
            *(urllib.parse.quote(json.dumps(v, separators=(",", ":"))) for v in (runs, [exp_id]))
        )
        await b.goto(f"{mlflow_url}/#/compare-runs?{q}", 1500, 2100)
        await b.wait_for(has_text("Comparing 2 Runs") + " && " + has_text("train/loss"), 90)
        await b.click(by_text("[role=tab], button", "Scatter Plot"))
        await b.wait_for("document.getElementById('x-axis-selector')", 30)
        for axis, key in (("x", "val/flops"), ("y", "val/bits_per_byte")):
            await b.click(f"document.getElementById('{axis}-axis-selector')")
            await b.click(by_text("[role=option]", key))
        # The differing params only (the variant, the model's shape), and MLflow's assistant
        # panel closed: the page is about the two runs.
        await b.click("document.querySelector('[role=switch]')")
        await b.js(
            "[...document.querySelectorAll('button')].filter(x => /close/i.test("
            "x.getAttribute('aria-label') || '')).forEach(x => x.click())"
        )
        # The metrics table scrolls on its own: bring its val/ rows (the last ones) into view.
        await b.js(
            f"{by_text('a, span, td', 'val/bits_per_byte')}?.scrollIntoView({{block: 'end'}})"
        )
        await b.js(f"{by_text('h1, h2, h3, h4, span, div', 'Visualizations')}.scrollIntoView()")
        await b.wait_for("document.querySelectorAll('.js-plotly-plot .xtick').length", 60)
        await asyncio.sleep(3)
        await b.png(out / "mlflow-compare-val-bpb-vs-flops.png")
        # 2. The report of the study (pipelines/report.py), top of the page and the whole page.
        await b.goto(report.as_uri(), 1400, 1800)
        await b.wait_for("document.readyState === 'complete' && document.images.length > 0", 60)
        await asyncio.sleep(2)
        await b.png(out / "scaling-report.png", full_page=False)


def pick_runs(uri: str) -> tuple[str, list[str]]:
    """The experiment id and the AU-Net and baseline cells at the largest budget."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    cells = client.search_runs(
        [exp.experiment_id], f"tags.`aunet.study` = '{STUDY}' and tags.`aunet.role` = 'cell'"
    )
    top = max(float(r.data.tags["aunet.budget"]) for r in cells)
    runs = {
        r.data.tags["aunet.variant"]: r.info.run_id
        for r in cells
        if float(r.data.tags["aunet.budget"]) == top and r.info.status == "FINISHED"
    }
    return exp.experiment_id, [runs["aunet2"], runs["baseline"]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", help="working directory (default: a new temporary one)")
    ap.add_argument("--out", default=str(REPO / "docs" / "img"))
    ap.add_argument("--port", type=int, default=0, help="mlflow server port (0: a free one)")
    ap.add_argument("--skip-training", action="store_true", help="reuse --work's study")
    ap.add_argument("--keep", action="store_true", help="keep the working directory")
    args = ap.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("error: no chromium on PATH (apt-get install -y chromium)", file=sys.stderr)
        return 2
    work = Path(args.work or tempfile.mkdtemp(prefix="aunet-shots-")).absolute()
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    report = work / "report" / "report.html"
    if not args.skip_training:
        report = train_and_report(work)
    uri = f"sqlite:///{work}/mlflow.db"
    exp_id, runs = pick_runs(uri)
    port, devtools = args.port or free_port(), free_port()
    procs = []
    with open(work / "mlflow-server.log", "w") as slog, open(work / "chromium.log", "w") as clog:
        try:
            server = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "mlflow",
                    "server",
                    "--backend-store-uri",
                    uri,
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--workers",
                    "1",
                ],
                cwd=work,
                stdout=subprocess.DEVNULL,
                stderr=slog,
                start_new_session=True,
            )
            procs.append(server)
            url = f"http://127.0.0.1:{port}"
            wait_http(f"{url}/health", 120)
            browser = subprocess.Popen(
                [
                    chromium,
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--hide-scrollbars",
                    f"--remote-debugging-port={devtools}",
                    f"--user-data-dir={work / 'chromium'}",
                    "--window-size=1600,1250",
                    "about:blank",
                ],
                stdout=subprocess.DEVNULL,
                stderr=clog,
                start_new_session=True,
            )
            procs.append(browser)
            wait_http(f"http://127.0.0.1:{devtools}/json/version", 60)
            asyncio.run(shoot(devtools, url, exp_id, runs, report, out))
        finally:
            for p in reversed(procs):  # by pid: the process group each was started in
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
            if not args.keep and not args.work:
                shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
