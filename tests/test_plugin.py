"""The vLLM plugin's registration (lk_vllm.plugin, no engine): the three entry points and vLLM loading them,
the VLLM_PLUGINS value, the version check and a registration that can run twice."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest

from lk_vllm import plugin

pytestmark = pytest.mark.unit


# ------------------------------------------------------------------------------------------------ registration
@pytest.mark.vllm
def test_entry_points_name_the_three_plugins():
    found = {
        group: {e.name: e.value for e in entry_points(group=group)}
        for group in ("vllm.general_plugins", "vllm.stat_logger_plugins", "vllm.endpoint_plugins")
    }
    assert found["vllm.general_plugins"]["lk_general"] == "lk_vllm.plugin:register"
    assert found["vllm.stat_logger_plugins"]["lk_stats"] == "lk_vllm.plugin.server.stat_logger:LkStatLogger"
    assert (
        found["vllm.endpoint_plugins"]["lk_endpoints"]
        == "lk_vllm.plugin.server.endpoints:make_endpoint_plugin"
    )
    # what vLLM's loader requires of each
    from vllm.plugins.endpoint_plugins.interface import EndpointPlugin
    from vllm.v1.metrics.loggers import StatLoggerBase

    from lk_vllm.plugin.server.endpoints import make_endpoint_plugin
    from lk_vllm.plugin.server.stat_logger import LkStatLogger

    assert issubclass(LkStatLogger, StatLoggerBase)
    assert isinstance(make_endpoint_plugin(), EndpointPlugin)
    # what VLLM_PLUGINS must name (plugins_env_value) is what lk-vllm installs, no more, no less
    installed = {
        name for group in found.values() for name, value in group.items() if value.startswith("lk_vllm.")
    }
    assert set(plugin.PLUGIN_NAMES) == installed


@pytest.mark.vllm
def test_vllm_loads_all_lk_plugins_when_vllm_plugins_names_them(monkeypatch):
    import vllm.envs
    from vllm.plugins import load_endpoint_plugins, load_plugins_by_group

    monkeypatch.setenv("VLLM_PLUGINS", plugin.plugins_env_value("other_plugin"))
    if hasattr(vllm.envs, "__getattr__") and hasattr(vllm.envs, "disable_envs_cache"):
        vllm.envs.disable_envs_cache()
    assert "lk_general" in load_plugins_by_group("vllm.general_plugins")
    assert "lk_stats" in load_plugins_by_group("vllm.stat_logger_plugins")
    assert [p.name for p in load_endpoint_plugins(("generate",))] == ["lk_endpoints"]
    # endpoint plugins need a "generate" server
    assert load_endpoint_plugins(("embed",)) == []


def test_plugins_env_value_keeps_the_users_list():
    assert plugin.plugins_env_value(None) == "lk_general,lk_stats,lk_endpoints"
    assert plugin.plugins_env_value("mine, lk_stats") == "mine,lk_stats,lk_general,lk_endpoints"


def test_register_refuses_another_vllm_version(monkeypatch, capsys):
    from lk_vllm import engine

    monkeypatch.setattr(engine, "vllm_version", lambda: "0.31.9")
    with pytest.raises(SystemExit) as exit_info:
        plugin.register()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "built for vLLM 0.32.0 but vLLM 0.31.9 is installed" in err


@pytest.mark.vllm
def test_register_is_idempotent():
    from vllm.v1.worker.worker_base import WorkerBase

    from lk_vllm.plugin import patches
    from lk_vllm.plugin.engine import worker

    plugin.register()
    plugin.register()
    assert WorkerBase.lk_reload_drafter is worker.lk_reload_drafter
    assert WorkerBase.lk_drafter_parameters is worker.lk_drafter_parameters
    from vllm.utils import cpu_triton_utils

    assert cpu_triton_utils._expand_kernel_impl is patches.expand_kernel_any_dtype
