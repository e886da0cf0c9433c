"""The web view on the real broker with the simulator: its JSON API as published, and the page in headless Chromium."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess

import httpx
import pytest

from datacreator import remote
from datacreator.contracts import CreationRequest, Strategy
from datacreator.export import export_request
from datacreator.serve import ServiceGroup
from datacreator.stack import LLMTarget, endpoint_json
from datacreator.view.server import ViewServer
from tests.helpers import MCQ, MCQ_INSTRUCTION
from tests.test_prometheus import wait_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _until(check, timeout_s: float = 30.0):
    return wait_for(check, timeout_s, "the view to show it")


@contextlib.asynccontextmanager
async def running_view(bus_settings, simulator):
    settings = bus_settings.with_updates(endpoints_json=endpoint_json(LLMTarget(simulator.base_url, "datacreator-simulator"), max_concurrency=2))
    group = await ServiceGroup(settings).start()
    view = await ViewServer(settings, port=0, embeddings=False, diversity_every_s=0.5).start()
    try:
        async with httpx.AsyncClient(base_url=view.url, timeout=10) as http:
            yield settings, view, http
    finally:
        await view.stop()
        await group.stop()


async def test_the_api_serves_examples_rejections_and_lineage_as_published(bus_settings, make_simulator, tmp_path):
    simulator = make_simulator(malformed_rate=0.3, seed=7)
    async with running_view(bus_settings, simulator) as (settings, view, http):
        request = CreationRequest(request_id="view-api", instruction=MCQ_INSTRUCTION, formatting_example=MCQ,
                                  target_count=40, examples_per_call=5, strategy=Strategy.tree, chains=2)
        await remote.submit(settings, request)
        final = await remote.wait_for_final(settings, request.request_id, timeout_s=90)
        published = await remote.collect_examples(settings, request.request_id)

        async def caught_up():
            detail = (await http.get("/api/requests/view-api")).json()
            return detail if detail["examples_kept"] == len(published) and detail["state"] == final.state.value else None

        detail = await _until(caught_up)
        assert detail["accepted"] == final.accepted == 40
        listed = (await http.get("/api/requests")).json()["requests"]
        assert "view-api" in [r["request_id"] for r in listed]

        pages, offset = [], 0
        while True:
            page = (await http.get("/api/requests/view-api/examples", params={"offset": offset, "limit": 15})).json()
            if not page["items"]:
                break
            pages.extend(page["items"])
            offset += 15
        assert {e["example_id"] for e in pages} == {e.example_id for e in published}
        stamps = [e["created_at"] for e in pages]
        assert stamps == sorted(stamps, reverse=True)  # newest first
        by_id = {e.example_id: e for e in published}
        for item in pages:
            original = by_id[item["example_id"]]
            assert item["data"] == original.data and item["task_id"] == original.task_id
            assert (item["chain"], item["step"], item["reference_ids"]) == (original.chain, original.step, original.reference_ids)
            assert item["label"] == original.data["answer"]

        query = published[0].data["question"][:12]
        found = (await http.get("/api/requests/view-api/examples", params={"q": query.upper()})).json()
        assert published[0].example_id in {e["example_id"] for e in found["items"]}
        assert all(query.lower() in json.dumps(e["data"]).lower() for e in found["items"])

        rejections = (await http.get("/api/requests/view-api/rejections")).json()["reasons"]
        unparseable = next(r for r in rejections if r["reason"] == "unparseable")
        assert unparseable["count"] == final.rejected["unparseable"]
        assert unparseable["samples"] and all(s["text"] for s in unparseable["samples"])

        # the tree: walking the lineage from the seed reaches every example, and a path ends at the seed
        reached, frontier = set(), ["seed"]
        while frontier:
            node = frontier.pop()
            children = (await http.get("/api/requests/view-api/lineage", params={"parent": node, "limit": 1000})).json()["children"]
            frontier.extend(c["id"] for c in children)
            reached.update(c["id"] for c in children)
        assert reached == set(by_id)
        deepest = max(published, key=lambda e: e.step)
        path = (await http.get("/api/requests/view-api/lineage", params={"path": deepest.example_id})).json()["path"]
        assert path[0]["id"] == deepest.example_id and path[-1]["id"] == "seed" and len(path) >= 2

        # the export buttons give the bytes `datacreator export` writes
        for fmt in ("jsonl", "parquet"):
            served = await http.get(f"/api/requests/view-api/export.{fmt}")
            assert served.status_code == 200
            manifest = json.loads((await export_request(settings, "view-api", tmp_path / f"cli.{fmt}", fmt)).read_bytes())
            assert served.content == (tmp_path / manifest["files"][0]["name"]).read_bytes()

        # bad input
        assert (await http.get("/api/requests/no-such")).status_code == 404
        assert (await http.get("/api/requests/no-such/examples")).status_code == 404
        assert (await http.get("/api/requests/view-api/lineage", params={"parent": "nope"})).status_code == 404
        huge = (await http.get("/api/requests/view-api/examples", params={"offset": 10**12})).json()
        assert huge["items"] == [] and huge["total"] == 40
        assert (await http.get("/api/requests/view-api/export.exe")).status_code == 400


class DevTools:
    """The least of the Chrome DevTools protocol: evaluate JavaScript in the page, take a screenshot."""

    def __init__(self, ws) -> None:
        self.ws, self.next_id = ws, 0

    async def call(self, method: str, **params):
        self.next_id += 1
        await self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(await asyncio.wait_for(self.ws.recv(), 20))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(message["error"])
                return message["result"]

    async def js(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result["result"].get("value")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
async def test_the_page_fills_while_a_request_runs(bus_settings, make_simulator, tmp_path):
    import websockets

    simulator = make_simulator(malformed_rate=0.25, latency_s=0.8, seed=3)
    async with running_view(bus_settings, simulator) as (settings, view, http):
        request = CreationRequest(request_id="view-page", instruction=MCQ_INSTRUCTION, formatting_example=MCQ,
                                  target_count=60, examples_per_call=5, strategy=Strategy.random, chains=2)
        await remote.submit(settings, request)
        profile = tmp_path / "chromium-profile"
        browser = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
             "--remote-debugging-port=0", "--window-size=1400,1600", view.url],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            port_file = profile / "DevToolsActivePort"
            await _until(lambda: asyncio.sleep(0, port_file.exists()), 30)
            port = (await _until(lambda: asyncio.sleep(0, port_file.read_text().split("\n")[0]), 10))

            async def page_target():
                async with httpx.AsyncClient() as local:
                    targets = (await local.get(f"http://127.0.0.1:{port}/json/list")).json()
                return next((t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page" and t["url"].startswith(view.url)), None)

            async with websockets.connect(await _until(page_target, 30), max_size=None) as ws:
                tools = DevTools(ws)
                accepted = "(() => { const m = /^(\\d+) of/.exec(document.querySelector('#progresstext').textContent); return m ? +m[1] : -1; })()"
                first = await _until(lambda: tools.js(accepted + " > 0 ? " + accepted + " : 0"), 40)
                status = await remote.latest_status(settings, "view-page")
                assert status is not None and not status.state.final, "the page is loaded while the request runs"
                later = await _until(lambda: tools.js(f"{accepted} > {first} ? {accepted} : 0"), 40)
                assert later > first  # progress moves without a reload
                assert await _until(lambda: tools.js("document.querySelectorAll('#examples tbody tr[data-id]').length"), 20) > 0
                reason = await _until(lambda: tools.js("document.querySelector('#rejections [data-reason]')?.dataset.reason"), 40)
                assert reason == "unparseable"
                await _until(lambda: tools.js("document.querySelector('#tree li[data-id=\"seed\"]:not(.leaf) > span') !== null"), 20)
                await tools.js("document.querySelector('#tree li[data-id=\"seed\"] > span').click()")
                children = await _until(lambda: tools.js("document.querySelectorAll('#tree li[data-id=\"seed\"] > ul > li[data-id]').length"), 20)
                assert children > 0  # the tree expanded
                shot = await tools.call("Page.captureScreenshot", format="png")
                (tmp_path / "view.png").write_bytes(base64.b64decode(shot["data"]))
                assert (tmp_path / "view.png").stat().st_size > 10_000
        finally:  # chromium's helper processes share its session: end them all, by the group id
            with contextlib.suppress(ProcessLookupError):
                os.killpg(browser.pid, signal.SIGTERM)
            try:
                browser.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(browser.pid, signal.SIGKILL)
                browser.wait(5)
