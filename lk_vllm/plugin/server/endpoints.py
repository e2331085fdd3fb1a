"""``vllm.endpoint_plugins`` entry point: lk-vllm's routes on vLLM's OpenAI server (see ``lk_vllm.plugin.server.routes``).

vLLM loads endpoint plugins only when ``VLLM_PLUGINS`` names them (``lk_endpoints``); ``lk-vllm serve`` sets it.
"""

from __future__ import annotations

from lk_vllm.plugin.server.routes import LkRoutes, attach


class LkEndpointPlugin:
    name = "lk_endpoints"
    required_tasks = ("generate",)

    def __init__(self) -> None:
        self.routes = LkRoutes()

    def attach_router(self, app) -> None:
        attach(app, self.routes)

    async def init_state(self, engine_client, state, args) -> None:
        self.routes.engine_client = engine_client
        if engine_client is not None:
            self.routes.target = engine_client.vllm_config.model_config.model


def make_endpoint_plugin() -> LkEndpointPlugin:
    return LkEndpointPlugin()
