"""A small headless-Chromium driver over the DevTools protocol: load a page, read its images and console errors,
take a screenshot. Used by the report's browser test and by benchmarks/report_screenshot.py.

Chromium starts with ``--remote-debugging-port=0`` (it picks a free port and writes it to DevToolsActivePort in
its profile folder); one websocket to the browser endpoint carries every command, and the page is driven in
flat-session mode (``Target.attachToTarget(flatten=True)``), so no HTTP endpoint or extra package is needed
besides ``websocket-client``.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

NAMES = ("chromium", "chromium-browser", "google-chrome-stable", "google-chrome")


def find_chromium() -> str | None:
    """$CHROMIUM if it is an executable, else the first Chromium-like browser on PATH (what .ci/chromium.sh finds)."""
    named = os.environ.get("CHROMIUM")
    if named and os.access(named, os.X_OK):
        return named
    for name in NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


class Browser:
    def __init__(self, binary: str, timeout: float = 30.0):
        import websocket

        self.timeout = timeout
        self.profile = Path(tempfile.mkdtemp(prefix="mergeopt-chromium-"))
        self.events: list[dict] = []
        self._next_id = 0
        # --no-sandbox: CI and containers run as root, where Chromium's sandbox refuses to start
        self.process = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--hide-scrollbars",
             "--remote-debugging-port=0", f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            port_file = self.profile / "DevToolsActivePort"
            deadline = time.monotonic() + timeout
            while not (port_file.is_file() and len(port_file.read_text().split()) >= 2):
                if self.process.poll() is not None:
                    raise RuntimeError(f"chromium exited with {self.process.returncode}: "
                                       f"{self.process.stderr.read().decode(errors='replace')[-2000:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"chromium wrote no DevToolsActivePort within {timeout:.0f} s")
                time.sleep(0.05)
            port, path = port_file.read_text().split()[:2]
            self.ws = websocket.create_connection(f"ws://127.0.0.1:{port}{path}", timeout=timeout,
                                                  suppress_origin=True)
        except BaseException:
            self.close()
            raise

    # ---- protocol ------------------------------------------------------------------------------
    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._next_id += 1
        message: dict = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self.ws.send(json.dumps(message))
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)
        raise TimeoutError(f"{method}: no answer within {self.timeout:.0f} s")

    def wait_event(self, name: str, session: str | None = None) -> dict:
        def match(e):
            return e["method"] == name and (session is None or e.get("sessionId") == session)

        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            for event in self.events:
                if match(event):
                    return event
            event = json.loads(self.ws.recv())
            if "method" in event:
                self.events.append(event)
        raise TimeoutError(f"no {name} event within {self.timeout:.0f} s")

    # ---- pages ---------------------------------------------------------------------------------
    def open(self, url: str, width: int = 1280, height: int = 900) -> str:
        """Open ``url`` in a new tab, wait for its load event; returns the page's session id."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable", session=session)
        self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                         "mobile": False}, session=session)
        self.events.clear()
        reply = self.send("Page.navigate", {"url": url}, session=session)
        if reply.get("errorText"):
            raise RuntimeError(f"cannot open {url}: {reply['errorText']}")
        self.wait_event("Page.loadEventFired", session)
        return session

    def evaluate(self, expression: str, session: str):
        reply = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                               "awaitPromise": True}, session=session)
        if "exceptionDetails" in reply:
            raise RuntimeError(f"page script failed: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def console_errors(self, session: str) -> list[str]:
        """Console errors, uncaught exceptions and browser log errors (e.g. a resource that failed to load)."""
        errors = []
        for e in self.events:
            if e.get("sessionId") != session:
                continue
            p = e.get("params", {})
            if e["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                errors.append("console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p["args"]))
            elif e["method"] == "Runtime.exceptionThrown":
                errors.append("exception: " + p["exceptionDetails"].get("text", ""))
            elif e["method"] == "Log.entryAdded" and p["entry"].get("level") == "error":
                errors.append(f"log: {p['entry'].get('text', '')} {p['entry'].get('url', '')}".strip())
        return errors

    def screenshot(self, session: str, path: str | Path, width: int = 1280) -> Path:
        """The whole page (not only the viewport) as a PNG."""
        height = int(self.evaluate("Math.ceil(document.documentElement.scrollHeight)", session))
        self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                         "mobile": False}, session=session)
        data = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True},
                         session=session)["data"]
        path = Path(path)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        ws = getattr(self, "ws", None)
        if ws is not None:
            try:
                self.send("Browser.close")
            except Exception:
                pass
            ws.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


IMAGES = ("Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete, width: i.naturalWidth, "
          "height: i.naturalHeight}))")


def inspect_page(html_file: str | Path, screenshot: str | Path | None = None, binary: str | None = None) -> dict:
    """Load a local HTML file headless: its images (natural sizes), console errors, and optionally a screenshot."""
    binary = binary or find_chromium()
    if binary is None:
        raise RuntimeError("no chromium found; run .ci/chromium.sh or set $CHROMIUM")
    with Browser(binary) as browser:
        session = browser.open(Path(html_file).resolve().as_uri())
        images = browser.evaluate(IMAGES, session)
        title = browser.evaluate("document.title", session)
        if screenshot is not None:
            browser.screenshot(session, screenshot)
        return {"title": title, "images": images, "errors": browser.console_errors(session)}
