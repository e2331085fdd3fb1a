"""Drafter swap on a running server (lk_vllm.plugin.server.swap).

Slow, one `lk-vllm serve` for the module: EAGLE-3 drafters (written by lk_vllm.drafters for the default target)
served by vLLM's own server with the lk plugins, behind the restart supervisor: live in-place drafter swap under
streaming load, refused swaps, per-drafter statistics, faithful sampling at T > 0 (the CPU rejection-sampler fix
in lk_vllm.plugin.patches), a swap to a Medusa drafter that restarts the engine under streaming load, and last,
in-place swaps between Medusa drafters and between MLP speculators (issue 21).

Fast, through the routes on a test client (no engine): the path must resolve inside --drafters-dir, a
same-shape drafter reloads in place, unusable ones are 4xx, and a restart is asked of the supervisor only when
there is one (plain vLLM with the plugins answers 409).
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import threading
import time
import urllib.request

import pytest
import torch
from drafter_helpers import drafter_dir
from safetensors.torch import load_file, save_file
from server_helpers import ADMIN
from train_helpers import make_valid_drafter

from serving.client import HTTPError, complete, request_json
from serving.launcher import start_server

pytestmark = pytest.mark.e2e


ADMIN_KEY = "swap-admin"
K = 2
PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."}]


def _write_drafters(target_dir, root):
    """Two random EAGLE-3 drafters of the same shape (different weights), one with a wider MLP, two Medusa
    drafters with K heads (another architecture: swapping to it restarts the engine; then one swaps in place for
    the other), one with too few heads, and two MLP speculators with K stages."""
    from lk_vllm.drafters import create_drafter, target_info
    from lk_vllm.target_model import TargetModel

    target = TargetModel(target_dir)
    info = target_info(target)
    draft_to_target = torch.arange(4096)  # a small draft vocabulary keeps the files small
    paths = {}
    for name, seed, intermediate in (("a", 1, 512), ("b", 2, 512), ("wide", 3, 768)):
        torch.manual_seed(seed)
        drafter = create_drafter(
            "eagle3", target, draft_to_target=draft_to_target, intermediate_size=intermediate
        )
        with torch.no_grad():
            for parameter in drafter.trainable_parameters():
                parameter.add_(torch.randn_like(parameter) * 0.01)
        paths[name] = drafter.save_pretrained(
            root / name, target=info, training={"loss": "lambda", "seed": seed}
        )
    for name, architecture, size, seed in (
        ("medusa", "medusa", K, 4),
        ("medusa_one_head", "medusa", 1, 4),
        ("medusa_b", "medusa", K, 5),
        ("mlp", "mlp_speculator", K, 6),
        ("mlp_b", "mlp_speculator", K, 7),
    ):
        torch.manual_seed(seed)
        size_argument = {"num_heads": size} if architecture == "medusa" else {"n_predict": size}
        drafter = create_drafter(architecture, target, **size_argument)
        with torch.no_grad():  # a fresh Medusa is seed-independent (zero blocks, the target's lm_head)
            for parameter in drafter.trainable_parameters():
                parameter.add_(torch.randn_like(parameter) * 0.01)
        paths[name] = drafter.save_pretrained(root / name, target=info, training={"loss": "kl"})
    # Copies of "a" that only lk-vllm validate's checks refuse: a NaN weight (same shapes, so it would reload in
    # place) and auxiliary layers other than the trained ones (vLLM would serve it with collapsed acceptance).
    import shutil

    from safetensors.torch import load_file, save_file

    paths["nan"] = shutil.copytree(paths["a"], root / "nan")
    weights = load_file(str(paths["nan"] / "model.safetensors"))
    weights["fc.weight"][0, 0] = float("nan")
    save_file(weights, str(paths["nan"] / "model.safetensors"))
    paths["wrong_aux"] = shutil.copytree(paths["a"], root / "wrong_aux")
    config = json.loads((paths["wrong_aux"] / "config.json").read_text())
    wrong = [i + 1 for i in config["eagle_aux_hidden_state_layer_ids"]]
    config["eagle_aux_hidden_state_layer_ids"] = config["eagle_config"][
        "eagle_aux_hidden_state_layer_ids"
    ] = wrong
    (paths["wrong_aux"] / "config.json").write_text(json.dumps(config))
    # A copy of "b" whose training record promises far more than a random drafter delivers: swapping it in
    # must raise the drift alarm.
    paths["promised"] = shutil.copytree(paths["b"], root / "promised")
    record = json.loads((paths["promised"] / "lk_training.json").read_text())
    record["training"]["heldout"] = {"top1_agreement": [0.9, 0.8], "per_position_alpha": [0.9, 0.8]}
    (paths["promised"] / "lk_training.json").write_text(json.dumps(record))
    return paths


@pytest.fixture(scope="module")
def server(tmp_path_factory, default_target):
    work = tmp_path_factory.mktemp("swap")
    drafters = work / "drafters"
    paths = _write_drafters(default_target, drafters)
    handle = start_server(
        [
            "--target",
            default_target,
            "--drafter",
            str(paths["a"]),
            "--num-speculative-tokens",
            str(K),
            "--admin-key",
            ADMIN_KEY,
            "--drafters-dir",
            str(drafters),
            "--no-calibrate",
            "--max-model-len",
            "1024",
            "--max-num-seqs",
            "16",
        ],
        log_path=work / "server.log",
        timeout=900,
    )
    try:
        yield {
            "url": handle.url,
            "model": default_target,
            "paths": paths,
            "drafters": drafters,
            "handle": handle,
        }
    except BaseException:
        print(handle.log_tail(80))
        raise
    finally:
        handle.stop()


def swap(server, path, key=ADMIN_KEY):
    return request_json(
        server["url"], "/v1/speculative/drafter", {"path": path}, headers={"X-Admin-Key": key}
    )


@pytest.mark.slow
def test_serve_runs_the_drafter_with_the_lk_plugins(server):
    stats = request_json(server["url"], "/v1/speculative/stats")
    assert stats["method"] == "eagle3" and stats["num_speculative_tokens"] == K
    assert stats["drafter"]["path"] == str(server["paths"]["a"])
    assert stats["drafter"]["loss"] == "lambda"
    assert stats["sampling"]["draft_sample_method"] == "probabilistic"
    assert stats["sampling"]["rejection_sample_method"] == "standard"


@pytest.mark.slow
def test_sampling_at_temperature_is_faithful(server):
    """With a random drafter almost every token is resampled by the rejection sampler, so without the CPU fix
    (lk_vllm.plugin.patches) the text is word salad with a mean token log-probability far below -4. Faithful
    sampling at T=0.7 stays near what the target assigns to its own samples."""
    logprobs = []
    for seed in range(4):
        result = complete(
            server["url"],
            server["model"],
            messages=PROMPT,
            max_tokens=40,
            temperature=0.7,
            seed=seed,
            logprobs=True,
        )
        assert result.spec_metrics["num_draft_tokens"] > 0
        logprobs += result.logprobs
    mean = sum(logprobs) / len(logprobs)
    assert math.isfinite(mean) and mean > -3.0, mean


@pytest.mark.slow
def test_swap_in_place_under_streaming_load_without_failures(server):
    """8 streaming clients keep generating while the drafter is swapped (same shapes: weights reloaded in the
    workers). Zero failed requests; greedy output does not depend on the drafter; statistics split per drafter."""
    url, model, paths = server["url"], server["model"], server["paths"]
    greedy_before = complete(url, model, messages=PROMPT, max_tokens=32).text
    stop = threading.Event()
    served = threading.Event()  # a request finished before the swap: drafter a has drafted
    fresh = threading.Event()  # a request that started after the swap returned has finished
    swap_returned: list[float] = []
    done: list = []

    def client(index: int) -> int:
        count = 0
        while not stop.is_set():
            started = time.monotonic()
            result = complete(
                url,
                model,
                messages=PROMPT,
                max_tokens=24,
                stream=True,
                temperature=0.5 * (index % 2),
                seed=index,
                timeout=600,
            )
            assert 0 < result.completion_tokens <= 24 and result.spec_metrics is not None
            served.set()
            if swap_returned and started > swap_returned[0]:
                fresh.set()
            count += 1
        return count

    # Events, not fixed windows: on a slow machine a request can take longer than any sleep.
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(client, i) for i in range(8)]
        try:
            assert served.wait(timeout=600), "no request finished before the swap"
            response = swap(server, "b")
            swap_returned.append(time.monotonic())
            assert fresh.wait(timeout=600), "no request started after the swap finished"
        finally:
            stop.set()  # the clients end their loops even when an assertion above failed
        done = [f.result() for f in futures]  # re-raises any client failure
    assert sum(done) >= 8
    assert response["status"] == "swapped" and response["previous"] == str(paths["a"])
    assert response["drafter"]["path"] == str(paths["b"])
    stats = request_json(url, "/v1/speculative/stats")
    assert stats["live_drafter"] == str(paths["b"])
    assert set(stats["drafters"]) == {str(paths["a"]), str(paths["b"])}
    for name in ("a", "b"):
        per_drafter = request_json(url, f"/v1/speculative/stats?drafter={paths[name]}&window=600")
        assert per_drafter["num_drafts"] > 0, name
    assert complete(url, model, messages=PROMPT, max_tokens=32).text == greedy_before
    worker = response["workers"][0]
    assert (
        worker["modules"] > 0 and worker["checksum"] != worker["checksum_before"]
    )  # the weights really changed
    again = swap(server, str(paths["a"]))  # and back, by absolute path
    assert again["drafter"]["path"] == str(paths["a"])
    assert again["workers"][0]["checksum"] == pytest.approx(worker["checksum_before"], rel=1e-9)


@pytest.mark.slow
def test_refused_swaps_leave_the_live_drafter_serving(server):
    live = request_json(server["url"], "/v1/speculative/stats")["live_drafter"]
    cases = [
        ("medusa_one_head", 400, "Medusa has 1 heads"),
        ("../swap", 403, "outside --drafters-dir"),
        ("nothing", 404, "not found"),
        ("nan", 400, "fc.weight has NaN"),
        ("wrong_aux", 400, "but the trainer used"),
    ]
    for path, status, reason in cases:
        with pytest.raises(HTTPError) as error:
            swap(server, path)
        assert error.value.status == status and reason in error.value.body, (path, error.value.body)
    with pytest.raises(HTTPError) as unauthorised:
        swap(server, "b", key="wrong")
    assert unauthorised.value.status == 403
    assert request_json(server["url"], "/v1/speculative/stats")["live_drafter"] == live
    assert complete(server["url"], server["model"], messages=PROMPT, max_tokens=8).completion_tokens == 8


@pytest.mark.slow
def test_swapping_in_a_drafter_that_misses_its_promise_raises_the_drift_alarm(server):
    """The swapped-in drafter's lk_training.json expects 1 + 0.9 + 0.9 * 0.8 = 2.62 tokens per step at T=0; it
    is random and accepts almost nothing. Under greedy streaming traffic the alarm goes up once the window
    holds enough drafts: the gauge, the stats' drift object, and the window's numbers."""
    url, model, paths = server["url"], server["model"], server["paths"]
    stop, judged = threading.Event(), threading.Event()

    def client(index: int) -> None:
        while not stop.is_set():
            result = complete(
                url, model, messages=PROMPT, max_tokens=24, stream=True, seed=index, timeout=120
            )
            assert result.completion_tokens > 0

    drift = None
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert swap(server, "promised")["status"] == "swapped"
        futures = [pool.submit(client, i) for i in range(4)]
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not judged.is_set():
            drift = request_json(url, "/v1/speculative/stats")["drift"]
            if drift["drifting"] is not None:
                judged.set()
            else:
                time.sleep(1)
        stop.set()
        for future in futures:
            future.result()
    assert judged.is_set(), drift
    assert drift["drifting"] is True and drift["drafter"] == str(paths["promised"])
    check = next(c for c in drift["checks"] if c["sampling"] == "temperature_0")
    assert check["expected"] == pytest.approx(1 + 0.9 + 0.9 * 0.8) and check["expected_source"]
    assert check["num_drafts"] >= 50 and check["observed"] < 0.75 * check["expected"] and check["drifting"]
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
        assert "lk_acceptance_drift 1.0" in response.read().decode()
    swap(server, "a")  # the next tests start from drafter a


@pytest.mark.slow
def test_swap_to_another_architecture_restarts_the_engine_without_breaking_streams(server):
    """EAGLE-3 -> Medusa needs a new engine: the supervisor drains the streams in flight, holds new requests
    while vLLM restarts with the Medusa config, then serves them with it. 6 streaming clients run throughout:
    zero failed or broken streams (a broken one raises in its client), the Medusa drafter serves, and the
    statistics of every drafter (kept in the restarted server's process) stay queryable."""
    url, model, paths = server["url"], server["model"], server["paths"]
    greedy_before = complete(url, model, messages=PROMPT, max_tokens=32).text
    live_before = request_json(url, "/v1/speculative/stats")["live_drafter"]
    stop = threading.Event()
    served = threading.Event()  # a request finished: the clients are in their loops, requests in flight
    fresh = threading.Event()  # a request that started after the swap returned has finished
    swap_returned: list[float] = []
    spans: list[tuple[float, float]] = []

    def client(index: int) -> int:
        count = 0
        while not stop.is_set():
            started = time.monotonic()
            result = complete(
                url,
                model,
                messages=PROMPT,
                max_tokens=24,
                stream=True,
                temperature=0.5 * (index % 2),
                seed=index,
                timeout=600,
            )
            assert 0 < result.completion_tokens <= 24 and result.spec_metrics is not None
            spans.append((started, time.monotonic()))
            served.set()
            if swap_returned and started > swap_returned[0]:
                fresh.set()
            count += 1
        return count

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(client, i) for i in range(6)]
        # Events, not fixed sleeps: on a slow machine a request (or the restart's drain) can outlast any sleep.
        try:
            assert served.wait(timeout=600), "no request finished before the swap"
            swap_started = time.monotonic()
            response = swap(server, "medusa")
            swap_finished = time.monotonic()
            swap_returned.append(swap_finished)
            assert fresh.wait(timeout=600), "no request that started after the swap finished"
        finally:
            stop.set()  # the clients end their loops even when an assertion above failed
        done = [f.result() for f in futures]  # re-raises any client failure
    restart = response["restart"]
    print(f"restart: {json.dumps(restart)}; requests completed: {sum(done)}")
    assert response["status"] == "swapped" and response["mode"] == "engine restart"
    assert response["previous"] == live_before and response["drafter"]["path"] == str(paths["medusa"])
    assert (
        restart["drained_requests"] >= 1
        and restart["waited_requests"] >= 1
        and restart["rejected_requests"] == 0
    )
    assert restart["statistics_carried_over"]
    assert [
        s for s in spans if s[0] < swap_started < s[1]
    ]  # in flight when the swap came, and finished whole
    assert [s for s in spans if s[0] > swap_finished]  # and new requests afterwards

    stats = request_json(url, "/v1/speculative/stats")
    assert stats["live_drafter"] == str(paths["medusa"]) and stats["method"] == "medusa"
    assert stats["drafter"]["architecture"] == "MedusaModel" and stats["num_speculative_tokens"] == K
    assert {str(paths[name]) for name in ("a", "b", "medusa")} <= set(stats["drafters"])
    for name in ("a", "b", "medusa"):  # per-drafter statistics from before and after the restart
        per_drafter = request_json(url, f"/v1/speculative/stats?drafter={paths[name]}&window=3600")
        assert per_drafter["num_drafts"] > 0 and per_drafter["since_start"]["num_drafts"] > 0, name
    assert (
        complete(url, model, messages=PROMPT, max_tokens=32).text == greedy_before
    )  # still the target's output


def _swap_under_streaming_load(server, path, clients=2):
    """Swap to ``path`` while ``clients`` streaming clients run; returns the swap's answer once a request that
    started after the swap finished (events, no fixed sleeps). A failed or broken stream raises."""
    url, model = server["url"], server["model"]
    stop, served, fresh = threading.Event(), threading.Event(), threading.Event()
    swapped: list[float] = []

    def client(index: int) -> None:
        while not stop.is_set():
            started = time.monotonic()
            result = complete(
                url,
                model,
                messages=PROMPT,
                max_tokens=16,
                stream=True,
                temperature=0.5 * index,
                seed=index,
                timeout=600,
            )
            assert 0 < result.completion_tokens <= 16 and result.spec_metrics is not None
            served.set()
            if swapped and started > swapped[0]:
                fresh.set()

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client, i) for i in range(clients)]
        try:
            assert served.wait(timeout=600), "no request was served before the swap"
            response = swap(server, path)
            swapped.append(time.monotonic())
            assert fresh.wait(timeout=600), "no request was served after the swap"
        finally:
            stop.set()
            for future in futures:
                future.result()  # re-raises any client failure
    return response


@pytest.mark.slow
@pytest.mark.parametrize("first, second", [("medusa", "medusa_b"), ("mlp", "mlp_b")])
def test_medusa_and_mlp_speculator_swap_in_place(server, first, second):
    """Two drafters of one non-EAGLE architecture and shape swap in place under streaming load: the workers
    reload the weights (vLLM's MedusaProposer keeps its config as ``spec_config``, lk-vllm's MLP proposer as
    ``speculative_config``; both are found), and swapping back restores the first drafter's weights exactly.
    The first of the pair is reached by an engine-restart swap from whatever serves before."""
    url, model, paths = server["url"], server["model"], server["paths"]
    if request_json(url, "/v1/speculative/stats")["live_drafter"] != str(paths[first]):
        assert swap(server, first)["mode"] == "engine restart"
    greedy_before = complete(url, model, messages=PROMPT, max_tokens=32).text
    response = _swap_under_streaming_load(server, second)
    assert response["status"] == "swapped" and response["mode"] == "in-place weight reload", response
    assert response["previous"] == str(paths[first]) and response["drafter"]["path"] == str(paths[second])
    worker = response["workers"][0]
    assert (
        worker["modules"] > 0 and worker["checksum"] != worker["checksum_before"]
    )  # the weights really changed
    per_drafter = request_json(url, f"/v1/speculative/stats?drafter={paths[second]}&window=600")
    assert per_drafter["num_drafts"] > 0  # the new drafter drafts
    assert (
        complete(url, model, messages=PROMPT, max_tokens=32).text == greedy_before
    )  # still the target's output
    back = swap(server, first)
    assert back["mode"] == "in-place weight reload"
    assert back["workers"][0]["checksum"] == pytest.approx(worker["checksum_before"], rel=1e-9)


# ---------------------------------------------------------------------------------- through the routes (fast)
@pytest.mark.unit
@pytest.mark.parametrize("path", ["../outside", "/etc", "live/../../outside", "link"])
def test_swap_paths_must_resolve_inside_the_drafters_dir(app_with_routes, tmp_path, path):
    client, routes, drafters, target = app_with_routes
    drafter_dir(tmp_path, "outside", seed=2)
    (drafters / "link").symlink_to(tmp_path / "outside")
    response = client.post("/v1/speculative/drafter", json={"path": path}, headers=ADMIN)
    assert response.status_code == 403, response.json()
    assert "outside --drafters-dir" in response.json()["error"]
    assert routes.engine_client.calls == []


@pytest.mark.unit
def test_swap_same_shape_reloads_in_place_and_keeps_stats_per_drafter(app_with_routes):
    client, routes, drafters, target = app_with_routes
    new = make_valid_drafter(drafters, "new", target, seed=3)
    old_name = routes.store.drafter.name
    routes.store.record_step(
        batch_size=1,
        output_tokens=2,
        timed=False,
        num_drafts=1,
        num_draft_tokens=2,
        num_accepted_tokens=1,
        accepted_per_position=[1, 0],
    )
    response = client.post("/v1/speculative/drafter", json={"path": "new"}, headers=ADMIN)
    assert response.status_code == 200, response.json()
    assert routes.engine_client.calls == [("lk_reload_drafter", (str(new),))]
    assert routes.store.drafter.name == str(new)
    routes.store.record_step(
        batch_size=1,
        output_tokens=3,
        timed=False,
        num_drafts=1,
        num_draft_tokens=2,
        num_accepted_tokens=2,
        accepted_per_position=[1, 1],
    )
    assert client.get("/v1/speculative/stats", params={"drafter": old_name}).json()["accepted_tokens"] == 1
    assert client.get("/v1/speculative/stats", params={"drafter": str(new)}).json()["accepted_tokens"] == 2
    assert set(client.get("/v1/speculative/stats").json()["drafters"]) == {old_name, str(new)}


@pytest.mark.unit
def test_bad_swaps_are_4xx_and_the_old_drafter_keeps_serving(app_with_routes):
    client, routes, drafters, target = app_with_routes
    make_valid_drafter(drafters, "wider", target, intermediate_size=256)
    make_valid_drafter(drafters, "other_arch", target, architecture="medusa", num_heads=2)
    nan = make_valid_drafter(drafters, "nan", target, seed=2)
    weights = load_file(str(nan / "model.safetensors"))
    weights["fc.weight"][0, 0] = float("nan")  # same tensors and shapes: only validate's checks see it
    save_file(weights, str(nan / "model.safetensors"))
    (drafters / "empty").mkdir()
    live = routes.store.drafter.name
    cases = {
        "wider": (409, "intermediate_size"),
        "other_arch": (409, "architectures"),
        "nan": (400, "fails validation: drafter"),
        "empty": (400, "no config.json"),
        "missing": (404, "not found"),
        "live": (409, "already the live drafter"),
    }
    for path, (status, reason) in cases.items():
        response = client.post("/v1/speculative/drafter", json={"path": path}, headers=ADMIN)
        assert response.status_code == status, (path, response.json())
        assert reason in response.json()["error"], (path, response.json())
    assert client.post("/v1/speculative/drafter", content=b"{bad", headers=ADMIN).status_code == 400
    assert client.post("/v1/speculative/drafter", json={"paths": "x"}, headers=ADMIN).status_code == 400
    assert routes.engine_client.calls == [] and routes.store.drafter.name == live


@pytest.mark.unit
def test_swap_refuses_a_drafter_trained_for_another_target(app_with_routes, tmp_path):
    client, routes, drafters, target = app_with_routes
    served = tmp_path / "target"
    served.mkdir()
    (served / "config.json").write_text(json.dumps({"vocab_size": 32}))
    routes.target = str(served)
    other = make_valid_drafter(drafters, "other_target", target, seed=4)
    (other / "lk_training.json").write_text(json.dumps({"target": {"fingerprint": "0000000000000000"}}))
    response = client.post("/v1/speculative/drafter", json={"path": "other_target"}, headers=ADMIN)
    assert response.status_code == 409 and "trained for target 0000000000000000" in response.json()["error"]


@pytest.mark.unit
def test_swap_route_asks_the_supervisor_for_a_restart_only_when_supervised(tmp_path, monkeypatch):
    """vLLM's side of a restart swap (lk_vllm.plugin.server.swap): under the supervisor a drafter of another architecture is
    checked and answered with the speculative config to restart with; unusable ones are 4xx; without the
    supervisor the same request is 409, and the live drafter never changes."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from train_helpers import make_tiny_target, make_valid_drafter

    from lk_vllm.plugin.server import routes as api
    from lk_vllm.plugin.server import swap
    from lk_vllm.plugin.server.live_stats import DrafterInfo, LiveStatsStore
    from lk_vllm.target_model import TargetModel

    drafters = tmp_path / "drafters"
    target = TargetModel(make_tiny_target(tmp_path / "target", layers=2))
    for name, heads in (("medusa", 2), ("one_head", 1)):
        make_valid_drafter(drafters, name, target, architecture="medusa", num_heads=heads)
    monkeypatch.setenv(api.ADMIN_KEY_ENV, "admin")
    monkeypatch.setenv(api.DRAFTERS_DIR_ENV, str(drafters))
    store = LiveStatsStore()
    store.set_drafter(
        DrafterInfo(name="ngram", method="ngram", architecture="ngram", num_speculative_tokens=2)
    )
    routes = api.LkRoutes(store)
    app = FastAPI()
    app.include_router(routes.router())
    client = TestClient(app)

    def post(path, **extra):
        return client.post(
            "/v1/speculative/drafter", json={"path": path, **extra}, headers={"X-Admin-Key": "admin"}
        )

    unsupervised = post("medusa")
    assert unsupervised.status_code == 409 and "no weights to swap" in unsupervised.json()["error"]
    monkeypatch.setenv(swap.SUPERVISED_ENV, "1")
    planned = post("medusa")
    assert planned.status_code == 200 and planned.headers[swap.RESTART_HEADER] == "required"
    plan = planned.json()
    assert plan["status"] == "restart-required" and plan["previous"] == "ngram"
    assert plan["speculative_config"] == {
        "method": "medusa",
        "model": str(drafters / "medusa"),
        "num_speculative_tokens": 2,
        "rejection_sample_method": "standard",
    }
    assert post("one_head").status_code == 400 and "1 heads" in post("one_head").json()["error"]
    assert post("medusa", num_speculative_tokens=0).status_code == 400
    assert post("medusa", num_speculative_tokens=3).status_code == 400  # more than its 2 heads
    assert store.drafter.name == "ngram"
