"""Shared fixtures, and the test tiers. Engine-starting fixtures are module-scoped in their own test files.

Every test carries exactly one tier marker (pyproject.toml lists them): ``unit`` (neither vLLM nor an engine),
``vllm`` (imports vLLM, starts no engine), ``engine`` (starts a vLLM engine), ``e2e`` (runs lk-vllm's own
commands or servers). A module sets its tier with ``pytestmark``; a marker on a test (its class, its
parametrize) overrides the module's. ``slow`` is about speed and is independent of the tier.

Layout: one test file per thing under test, its name saying which (tests/test_layout.py checks the names).
``tests/test_<name>.py`` tests one of:

* a module or package of ``lk_vllm/``, ``training/``, ``serving/``: ``<name>`` is the shortest tail of its dotted
  path, dots as underscores, that no other module or package shares (a package is its ``__init__``):
  test_routes.py is lk_vllm/plugin/server/routes.py, test_server_capture.py and test_training_capture.py are the
  two capture.py, test_lk_vllm_engine.py is lk_vllm/engine.py (lk_vllm/plugin/engine/ is "engine" too),
  test_losses.py is lk_vllm/losses/;
* an lk-vllm command (``COMMANDS`` in lk_vllm/cli.py) run end to end: test_serve.py, test_eval.py. A command
  that has its module's name (train, prepare, validate, calibrate, bench, demo) shares its module's file;
* a script ``examples/<name>.sh``, ``scripts/<name>.{sh,py}`` or ``benchmarks/<name>.py`` (a shell script and the
  Python it runs may share the name): test_gpu_check.py, test_retrain_from_traffic.py;
* a check over the whole repository: test_layering.py, test_packaging.py, test_tiers.py, test_layout.py.

A name means exactly one of these. A test lives in the file of the module whose code it checks: the one that
defines what the test calls to get what it asserts on (names a package's ``__init__`` defines are the
package's; what only builds inputs, a tiny target or a drafter, does not count). A test that starts lk-vllm's
server or vLLM engines to check behaviour spread over several modules lives in the file of the command it runs.
Tests that share an engine, a server, or module constants that differ between files stay in one file, that of
what they mainly test. Tiers stay markers, never folders. Test files never import each other: a fixture several
files need is defined here, and the helpers and constants several files need (those of these fixtures too) live
in topic modules beside this file, imported by name (``from drafter_helpers import VOCAB, make_eagle3``):
drafter_helpers.py, train_helpers.py, parity_helpers.py, bench_helpers.py, server_helpers.py, loss_helpers.py,
repo_helpers.py. A fixture or helper only one file uses stays in that file. Files that are no test (this file,
the helpers, fake_vllm.py) have names without ``test_``.
"""

from __future__ import annotations

import sys

import pytest

pytest_plugins = ["pytester"]  # tests/test_tiers.py runs these hooks on tiny test files

# The helpers' asserts report their values as a test's do.
pytest.register_assert_rewrite(
    "bench_helpers",
    "drafter_helpers",
    "loss_helpers",
    "parity_helpers",
    "repo_helpers",
    "server_helpers",
    "train_helpers",
)

TIERS = ("unit", "vllm", "engine", "e2e")
_VLLM_BEFORE = pytest.StashKey[bool]()


# ------------------------------------------------------------------------------------------------ shared fixtures
# They import what they use inside them: tests/test_tiers.py runs a copy of this file where no helper is importable.
# A module-scoped fixture is built once per test module that uses it; a test file's own fixture of the same name
# (test_validate.py's target, test_training_capture.py's tiny) takes its place there.
@pytest.fixture(scope="session")
def default_target() -> str:
    """The embedded default target directory (built once; `make test` builds it before pytest starts)."""
    from lk_vllm.assets import resolve_target

    return resolve_target(None)


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    """The drafter tests' tiny random Llama (drafter_helpers.tiny_llama: LAYERS, HIDDEN, VOCAB), saved."""
    from drafter_helpers import tiny_llama

    path = tmp_path_factory.mktemp("tiny_target")
    tiny_llama(0).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def target(target_dir):
    from lk_vllm.target_model import TargetModel

    return TargetModel(target_dir)


@pytest.fixture(scope="module")
def batch():
    """Two rows of random token ids for ``target``, and their mask."""
    import torch
    from drafter_helpers import VOCAB

    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 12))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 9:] = False  # right padding on the second row
    return ids, mask


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory, default_target):
    """A tiny random Gemma-3 target (drafter_helpers.make_target) with the default target's tokenizer."""
    from drafter_helpers import make_target

    return make_target("gemma3", tmp_path_factory.mktemp("gemma3"), default_target)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The trainer tests' tiny target and a data set prepared for it: (target directory, data directory)."""
    from train_helpers import make_tiny_data, make_tiny_target

    root = tmp_path_factory.mktemp("tiny")
    target = make_tiny_target(root / "target")
    data = make_tiny_data(root / "data", target, num_samples=24)
    return target, data


@pytest.fixture(scope="module")
def setup(default_target):
    """The parity tests' default target, evaluation prompts and the target's greedy continuations of them."""
    import torch
    from parity_helpers import MAX_TOKENS, NUM_PROMPTS, K
    from train_helpers import greedy_batch

    from lk_vllm.datasets import load_prompts
    from lk_vllm.target_model import TargetModel

    torch.manual_seed(0)
    target = TargetModel(default_target)
    prompts = load_prompts("mtbench", split="eval", limit=NUM_PROMPTS)
    return {"target": target, "prompts": prompts, **greedy_batch(target, prompts, MAX_TOKENS + K + 1)}


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory):
    from train_helpers import make_tiny_target

    from lk_vllm.target_model import TargetModel

    return TargetModel(make_tiny_target(tmp_path_factory.mktemp("tiny-target")))


@pytest.fixture
def app_with_routes(tmp_path, monkeypatch, tiny_target):
    """lk-vllm's routes on a FastAPI test client without an engine, a live drafter in a drafters directory, the
    admin key server_helpers.ADMIN: (client, routes, drafters directory, tiny_target)."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from server_helpers import FakeEngineClient
    from train_helpers import make_valid_drafter

    from lk_vllm.plugin.server import routes as api
    from lk_vllm.plugin.server.live_stats import DrafterInfo, LiveStatsStore

    drafters = tmp_path / "drafters"
    live = make_valid_drafter(drafters, "live", tiny_target, seed=1)
    monkeypatch.setenv(api.ADMIN_KEY_ENV, "admin-secret")
    monkeypatch.setenv(api.DRAFTERS_DIR_ENV, str(drafters))
    store = LiveStatsStore()
    routes = api.LkRoutes(store)
    routes.engine_client = FakeEngineClient()
    app = FastAPI()
    app.include_router(routes.router())
    store.set_drafter(
        DrafterInfo(
            name=str(live),
            method="eagle3",
            architecture="LlamaForCausalLMEagle3",
            num_speculative_tokens=2,
            sampling={"draft_sample_method": "probabilistic"},
        )
    )
    return TestClient(app), routes, drafters, tiny_target


# ---------------------------------------------------------------------------------------------------------- tiers


def tier_of(item: pytest.Item) -> str | None:
    """The closest tier marker (test, then class, then module); two different tiers on one node are an error."""
    node = item
    while node is not None:
        own = {mark.name for mark in node.own_markers if mark.name in TIERS}
        if len(own) > 1:
            raise pytest.UsageError(
                f"{item.nodeid}: {node.name} carries tiers {', '.join(sorted(own))}; give it one"
            )
        if own:
            return own.pop()
        node = node.parent
    return None


# tryfirst: before `-m` deselects anything, so an untiered test is refused whatever the selection.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse a test without a tier: `-m unit` (make test-fast) would silently never run it."""
    tiers = [tier_of(item) for item in items]
    untiered = [item.nodeid for item, tier in zip(items, tiers, strict=True) if tier is None]
    if untiered:
        more = f" (and {len(untiered) - 1} more)" if len(untiered) > 1 else ""
        raise pytest.UsageError(
            f"{untiered[0]}{more} has no tier: mark it or its module (pytestmark) with one of "
            f"{', '.join(TIERS)}"
        )
    # `-m unit` matches a marker anywhere above a test, so the module's tier would still select a test that
    # overrides it: leave every test its one tier, on the test itself.
    for item, tier in zip(items, tiers, strict=True):
        for node in item.listchain():
            node.own_markers[:] = [mark for mark in node.own_markers if mark.name not in TIERS]
        item.add_marker(tier)


# A unit test must not import vLLM (~10 s on 2 cores, and the point of the tier). Imports in fixtures count, so
# the "before" snapshot is taken ahead of setup. Once an earlier non-unit test has imported vLLM this cannot see
# later ones; `make test-fast` runs the unit tier alone, where it matters.
@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    item.stash[_VLLM_BEFORE] = "vllm" in sys.modules
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    result = yield
    if tier_of(item) == "unit" and not item.stash.get(_VLLM_BEFORE, True) and "vllm" in sys.modules:
        pytest.fail(
            f"{item.nodeid} is marked unit but imported vLLM; mark it vllm, engine or e2e", pytrace=False
        )
    return result
