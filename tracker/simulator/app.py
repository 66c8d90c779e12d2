"""The simulator as one aiohttp application: the API, the file host, the test hooks."""

from __future__ import annotations

import asyncio
from typing import Any, Final

from aiohttp import web

from tracker.simulator.api import OUTPUT_DIR, DeepvueApi
from tracker.simulator.config import SimulatorConfig
from tracker.simulator.files import FileHost
from tracker.simulator.signing import Signer
from tracker.simulator.state import SimulatorState
from tracker.simulator.webhooks import NotLoopback, WebhookSender


class Simulator:
    """The parts sharing one state and one key, and the test hooks on that state."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.state = SimulatorState(config)
        signer = Signer(config.client_id)
        # Set on shutdown so `stall-` responses end instead of holding the server for an hour.
        self.stopping = asyncio.Event()
        self.webhooks = WebhookSender(config)
        self.api = DeepvueApi(config, self.state, signer, self.stopping, self.webhooks)
        self.files = FileHost(config, self.state, signer, self.stopping)

    def serve_at(self, base_url: str) -> None:
        """The bound address, which the output URLs point at."""
        self.api.base_url = base_url

    def snapshot(self) -> dict[str, Any]:
        return {**self.state.snapshot(), **self.webhooks.snapshot()}

    def reset(self) -> None:
        self.state.reset()
        self.webhooks.reset()

    async def stats(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.snapshot())

    async def reset_endpoint(self, request: web.Request) -> web.StreamResponse:
        self.reset()
        return web.json_response({"reset": True})

    async def register_webhook(self, request: web.Request) -> web.StreamResponse:
        """`{"url": ..., "request_id": optional}`: where that id's (or every id's) webhook goes."""
        try:
            body = await request.json()
        except ValueError:
            body = None
        url = body.get("url") if isinstance(body, dict) else None
        request_id = body.get("request_id") if isinstance(body, dict) else None
        if not isinstance(url, str) or not isinstance(request_id, str | None):
            return web.json_response(
                {"detail": 'expected {"url": str, "request_id": str (optional)}'}, status=400
            )
        try:
            self.webhooks.register(url, request_id)
        except NotLoopback as exc:
            return web.json_response({"detail": str(exc)}, status=400)
        return web.json_response({"registered": True, "url": url, "request_id": request_id})


SIMULATOR_KEY: Final = web.AppKey("deepvue_simulator", Simulator)


def build_app(config: SimulatorConfig) -> web.Application:
    simulator = Simulator(config)
    app = web.Application()
    app[SIMULATOR_KEY] = simulator

    async def stop_stalls(app: web.Application) -> None:
        simulator.stopping.set()

    async def stop_webhooks(app: web.Application) -> None:
        await simulator.webhooks.close()

    app.on_shutdown.append(stop_stalls)
    app.on_cleanup.append(stop_webhooks)
    app.router.add_post("/v1/authorize", simulator.api.authorize)
    app.router.add_get("/v1/verification/batch-processing-status", simulator.api.status)
    app.router.add_post("/v1/verification/upi-basic/batch", simulator.api.submit)
    app.router.add_get(OUTPUT_DIR + "{name}", simulator.files.download)
    app.router.add_get("/_sim/stats", simulator.stats)
    app.router.add_post("/_sim/reset", simulator.reset_endpoint)
    app.router.add_post("/_sim/webhooks", simulator.register_webhook)
    return app
