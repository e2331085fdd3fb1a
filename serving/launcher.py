"""``lk-vllm serve``: vLLM's own OpenAI-compatible server with a drafter and the lk-vllm plugins.

The command checks its input (one-line errors, before any engine starts), measures the no-speculation
baseline once per target/dtype/hardware/vLLM (``lk-vllm calibrate``, cached) and then runs vLLM's own server
(``vllm.entrypoints.launchers.api_server.entry``) behind the restart supervisor (``serving.supervisor``: it
passes every request through, and restarts the engine for drafter swaps that need it), or with
``--no-supervisor`` *replaces itself* with vLLM's server process. Either way every vLLM route and flag behaves as
with vLLM alone. What lk-vllm adds comes in through the plugins (``lk_vllm.plugin``), which ``VLLM_PLUGINS``
names, with their settings in environment variables:

* ``LK_VLLM_ADMIN_KEY`` (``--admin-key``), ``LK_VLLM_DRAFTERS_DIR`` (``--drafters-dir``),
  ``LK_VLLM_BASELINE_PROFILE`` (``--baseline-profile`` or the cached calibration), ``LK_VLLM_DRIFT`` (the drift
  alarm's flags), ``LK_VLLM_CAPTURE`` (``--capture-low-acceptance`` and its flags, ``lk_vllm.plugin.server.capture``);
* ``VLLM_API_KEY`` (``--api-key``): vLLM's own API-key check, kept out of the process list.

Speculative sampling at temperature > 0 is configured to be faithful: drafters that are models sample their
drafts from their distribution (``draft_sample_method=probabilistic``) and vLLM's standard rejection sampler
verifies them, so outputs follow the target's distribution (LK_PAPER.md §3). ``/v1/speculative/stats``
reports the modes in force.

For scripts (``lk-vllm demo``, tests): :func:`start_server` runs ``lk-vllm serve`` as a subprocess, waits until
it is healthy and returns a :class:`ServerHandle` (``url``, ``stop()``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lk_vllm.assets import resolve_target
from lk_vllm.drafters import check_drafter_for_target, speculative_config_for, with_faithful_sampling
from lk_vllm.engine import (
    EngineSettings,
    add_engine_arguments,
    apply_engine_env,
    check_cpu_settings,
    engine_arguments,
    settings_from_args,
)
from lk_vllm.env import ADMIN_KEY_ENV, BASELINE_PROFILE_ENV, CAPTURE_ENV, DRAFTERS_DIR_ENV, DRIFT_ENV
from lk_vllm.errors import UserError, require_at_least
from lk_vllm.plugin import plugins_env_value
from lk_vllm.plugin.server.capture import CaptureSettings
from lk_vllm.plugin.server.drift import DriftSettings
from lk_vllm.plugin.server.speedup import load_cached_profile, profile_key_for_settings, profile_path
from lk_vllm.targets import add_target_argument, check_target
from lk_vllm.validate import require_valid
from serving.supervisor import Supervisor

DEFAULT_NUM_SPECULATIVE_TOKENS = 3
VLLM_SERVER_MODULE = "vllm.entrypoints.launchers.api_server.entry"


def vllm_server_argv(
    settings: EngineSettings, listen: list[str], extra: list[str] | tuple[str, ...] = ()
) -> list[str]:
    """vLLM's OpenAI server with these engine settings, listening where ``listen`` says."""
    return [sys.executable, "-m", VLLM_SERVER_MODULE, *settings.server_args(), *listen, *extra]


# Methods whose drafters ``lk-vllm validate`` knows (lk_vllm.drafters); others (ngram, EAGLE-1, ...) go to vLLM unchecked.
VALIDATED_METHODS = ("eagle3", "medusa", "mlp_speculator", "draft_model")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_target_argument(parser, "the embedded SmolLM2-135M-Instruct", positional=True)
    spec = parser.add_mutually_exclusive_group()
    spec.add_argument(
        "--drafter", metavar="DIR", help="drafter checkpoint directory (written by lk-vllm train)"
    )
    spec.add_argument(
        "--speculative-config",
        metavar="JSON",
        help='vLLM speculative config as JSON, e.g. \'{"method": "ngram", "num_speculative_tokens": 4, '
        '"prompt_lookup_max": 4}\'',
    )
    parser.add_argument(
        "--num-speculative-tokens",
        type=int,
        default=None,
        metavar="K",
        help=f"draft tokens per step (default {DEFAULT_NUM_SPECULATIVE_TOKENS} with --drafter)",
    )
    parser.add_argument(
        "--api-key", default=None, help="require this key on OpenAI routes (as vLLM's --api-key)"
    )
    parser.add_argument(
        "--admin-key",
        default=None,
        help="key for admin routes (drafter swap); without it admin routes are refused",
    )
    parser.add_argument(
        "--drafters-dir",
        metavar="DIR",
        default=None,
        help="directory drafter swaps may load from (nothing outside it is ever opened)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--max-num-seqs", type=int, default=None, help="most concurrent requests in a batch")
    parser.add_argument(
        "--baseline-profile",
        metavar="FILE",
        default=None,
        help="calibration profile for the live speed-up (default: the cached one, measured on first start)",
    )
    parser.add_argument(
        "--no-calibrate",
        action="store_true",
        help="do not measure the baseline at start (speed-up is reported only if a profile exists)",
    )
    parser.add_argument(
        "--per-request-spec-decode-metrics",
        choices=("none", "summary", "detailed"),
        default="summary",
        help="acceptance metrics in every response (default summary)",
    )
    parser.add_argument("--print-command", action="store_true", help="print the vLLM command and exit")
    drift = parser.add_argument_group("acceptance drift alarm (lk_acceptance_drift, the dashboard banner)")
    drift.add_argument(
        "--drift-threshold",
        type=float,
        default=0.75,
        metavar="FRACTION",
        help="alarm when the windowed acceptance length falls below this fraction, in (0, 1], of the "
        "drafter's expected one (default 0.75)",
    )
    drift.add_argument(
        "--drift-window",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="window the acceptance length is measured over (default 300)",
    )
    drift.add_argument(
        "--drift-reference-minutes",
        type=float,
        default=5.0,
        metavar="MINUTES",
        help="for a drafter without held-out numbers in lk_training.json, the expected acceptance "
        "is its first MINUTES of traffic (default 5)",
    )
    capture = parser.add_argument_group(
        "traffic capture for retraining (opt-in; see serving/README.md for privacy)"
    )
    capture.add_argument(
        "--capture-low-acceptance",
        metavar="DIR",
        default=None,
        help="write the prompts (messages only: never headers or API keys) of requests whose own "
        "acceptance length is in the lowest --capture-quantile to rotating JSONL files in DIR, "
        "readable by `lk-vllm prepare --dataset FILE` (default off)",
    )
    capture.add_argument(
        "--capture-quantile",
        type=float,
        default=0.2,
        metavar="FRACTION",
        help="capture requests at or below this quantile, in (0, 1), of recent per-request "
        "acceptance lengths of the same sampling mode (default 0.2)",
    )
    capture.add_argument(
        "--capture-max-mb",
        type=float,
        default=1024.0,
        metavar="MIB",
        help="stop capturing after writing this many MiB (default 1024)",
    )
    restart = parser.add_argument_group("engine restarts (drafter swaps to another architecture or shape)")
    restart.add_argument(
        "--restart-wait",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="while the engine restarts, new requests wait this long, then get 503 with Retry-After "
        "(default 300)",
    )
    restart.add_argument(
        "--drain-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="requests in flight must finish within this before a restart, else the swap is "
        "called off (default 300)",
    )
    restart.add_argument(
        "--no-supervisor",
        action="store_true",
        help="run vLLM's server in this process, with no supervisor in front: no proxy hop, but "
        "swaps that need an engine restart are refused (409)",
    )
    add_engine_arguments(parser)
    parser.epilog = (
        "Anything after `--` is passed to vLLM's server unchanged, e.g. `-- --max-num-batched-tokens 4096`."
    )
    _pass_through_after_double_dash(parser)


def _pass_through_after_double_dash(parser: argparse.ArgumentParser) -> None:
    """Make ``parser.parse_args`` put everything after the first ``--`` into ``args.vllm_args`` untouched
    (argparse alone would mix it with the optional TARGET positional)."""
    parse = parser.parse_args

    def parse_args(args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        cut = args.index("--") if "--" in args else len(args)
        parsed = parse(args[:cut], namespace)
        parsed.vllm_args = args[cut + 1 :]
        return parsed

    parser.parse_args = parse_args


# --------------------------------------------------------------------------------------------------- input checks
def parse_speculative_config(text: str) -> dict[str, Any]:
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"--speculative-config: expected a JSON object, got invalid JSON ({exc.msg} at char {exc.pos})"
        ) from None
    if not isinstance(config, dict):
        raise UserError(f"--speculative-config: expected a JSON object, got {type(config).__name__}")
    if not config.get("method") and not config.get("model"):
        raise UserError('--speculative-config: expected a "method" (e.g. "ngram", "eagle3") or a "model"')
    model = config.get("model")
    if model and config.get("method") != "ngram" and not Path(str(model)).expanduser().is_dir():
        raise UserError(f"--speculative-config: drafter model directory {model} not found")
    return config


def speculative_config_from_args(args: argparse.Namespace, target: str) -> dict[str, Any] | None:
    """The speculative config to serve, with faithful sampling settings filled in, or None (no speculation).
    A drafter must pass ``lk-vllm validate``'s static checks (the first error refuses, before any engine starts)."""
    if args.num_speculative_tokens is not None:
        require_at_least("--num-speculative-tokens", args.num_speculative_tokens)
    if args.drafter:
        drafter = Path(args.drafter).expanduser()
        if not drafter.is_dir():
            raise UserError(f"--drafter {args.drafter}: directory not found")
        if not (drafter / "config.json").is_file():
            raise UserError(
                f"--drafter {args.drafter}: no config.json (expected a drafter checkpoint directory)"
            )
        check_drafter_for_target(drafter, target)

        config = speculative_config_for(
            drafter, args.num_speculative_tokens or DEFAULT_NUM_SPECULATIVE_TOKENS
        )
        require_valid(drafter, target, config["num_speculative_tokens"], "--drafter")
    elif args.speculative_config:
        config = parse_speculative_config(args.speculative_config)
        if args.num_speculative_tokens is not None:
            config["num_speculative_tokens"] = args.num_speculative_tokens
        if config.get("model") and config.get("method") != "ngram":
            drafter = Path(str(config["model"])).expanduser().resolve()
            check_drafter_for_target(drafter, target)
            config["model"] = str(drafter)  # always with a '/', never taken for a class path
            if config.get("method") in VALIDATED_METHODS and "num_speculative_tokens" in config:
                require_valid(
                    drafter, target, int(config["num_speculative_tokens"]), "--speculative-config model"
                )
        if "num_speculative_tokens" not in config:
            raise UserError(
                "--speculative-config: expected num_speculative_tokens (or pass --num-speculative-tokens)"
            )
    else:
        return None
    return with_faithful_sampling(config)


# ------------------------------------------------------------------------------------------------- the command
@dataclasses.dataclass
class ServerCommand:
    argv: list[str]  # vLLM's server on --host/--port (what --no-supervisor runs)
    env: dict[str, str]
    target: str
    speculative_config: dict[str, Any] | None
    settings: EngineSettings
    vllm_flags: list[str] = dataclasses.field(
        default_factory=list
    )  # per-request metrics, the user's `--` flags

    def vllm_argv(self, speculative_config: dict[str, Any] | None, listen: list[str]) -> list[str]:
        """vLLM's server with another speculative config, listening where ``listen`` says (the supervisor's
        engine restarts)."""
        settings = dataclasses.replace(self.settings, speculative_config=speculative_config)
        return vllm_server_argv(settings, listen, self.vllm_flags)


def build_server_command(args: argparse.Namespace) -> ServerCommand:
    """Everything needed to exec vLLM's server, from the parsed flags (raises UserError on bad input)."""
    target = resolve_target(args.target)
    spec = speculative_config_from_args(args, target)
    settings = settings_from_args(args, target, speculative_config=spec, max_num_seqs=args.max_num_seqs)
    check_cpu_settings(settings)
    vllm_flags = []
    if spec is not None and args.per_request_spec_decode_metrics != "none":
        vllm_flags += ["--per-request-spec-decode-metrics", args.per_request_spec_decode_metrics]
    vllm_flags += list(getattr(args, "vllm_args", None) or [])
    if not getattr(args, "no_supervisor", True) and any(
        flag.startswith(("--ssl", "--uds")) for flag in vllm_flags
    ):
        raise UserError(
            "TLS and --uds flags apply to vLLM's own listener: pass --no-supervisor with them "
            "(or terminate TLS in front of lk-vllm serve)"
        )
    argv = vllm_server_argv(settings, ["--host", args.host, "--port", str(args.port)], vllm_flags)

    env = dict(os.environ)
    env["VLLM_PLUGINS"] = plugins_env_value(env.get("VLLM_PLUGINS"))
    if args.api_key:
        env["VLLM_API_KEY"] = args.api_key
    if args.admin_key:
        env[ADMIN_KEY_ENV] = args.admin_key
    if args.drafters_dir:
        drafters_dir = Path(args.drafters_dir).expanduser()
        if not drafters_dir.is_dir():
            raise UserError(f"--drafters-dir {args.drafters_dir}: directory not found")
        env[DRAFTERS_DIR_ENV] = str(drafters_dir.resolve())
    drift = DriftSettings(
        threshold=args.drift_threshold,
        window_seconds=args.drift_window,
        reference_seconds=60.0 * args.drift_reference_minutes,
    )  # UserError on bad values
    env[DRIFT_ENV] = json.dumps(dataclasses.asdict(drift))
    capture_dir = getattr(args, "capture_low_acceptance", None)
    capture = CaptureSettings(
        directory=str(Path(capture_dir).expanduser().resolve()) if capture_dir else None,
        quantile=args.capture_quantile,
        max_megabytes=args.capture_max_mb,
    )  # UserError if bad
    env[CAPTURE_ENV] = json.dumps(dataclasses.asdict(capture))
    if capture.directory and (spec is None or args.per_request_spec_decode_metrics == "none"):
        raise UserError(
            "--capture-low-acceptance: needs speculative decoding (--drafter or --speculative-config) "
            "with --per-request-spec-decode-metrics summary or detailed; without them no request has "
            "its own acceptance length"
        )
    if args.baseline_profile:
        from lk_vllm.plugin.server.speedup import BaselineProfile

        BaselineProfile.load(args.baseline_profile)  # fail now, in one line, not inside the server
        env[BASELINE_PROFILE_ENV] = str(Path(args.baseline_profile).resolve())
    check_target(target, spec.get("method") if spec else None)  # after the flags: their errors come first
    return ServerCommand(
        argv=argv, env=env, target=target, speculative_config=spec, settings=settings, vllm_flags=vllm_flags
    )


def ensure_calibrated(command: ServerCommand, args: argparse.Namespace) -> None:
    """Measure the no-speculation baseline once (cached) unless a profile was given or calibration is off."""
    if command.speculative_config is None or args.baseline_profile or args.no_calibrate:
        return

    key = profile_key_for_settings(command.settings)
    path = profile_path(key)
    command.env[BASELINE_PROFILE_ENV] = str(path)
    if load_cached_profile(key) is not None:
        return
    print(
        f"lk-vllm serve: no baseline for this target/dtype/hardware yet; measuring it once "
        f"(cached at {path})",
        file=sys.stderr,
        flush=True,
    )
    calibrate = [
        sys.executable,
        "-m",
        "lk_vllm.cli",
        "calibrate",
        "--target",
        command.target,
        *engine_arguments(command.settings),
    ]
    result = subprocess.run(calibrate, env=command.env)
    if result.returncode != 0:
        raise UserError(
            "calibration failed (see above); pass --no-calibrate to serve without a speed-up figure"
        )


def run(args: argparse.Namespace) -> int:
    apply_engine_env()
    command = build_server_command(args)
    if args.print_command:
        print(shlex.join(command.argv))
        return 0
    ensure_calibrated(command, args)
    if args.no_supervisor:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(command.argv[0], command.argv, command.env)  # vLLM's server takes over this process

    return Supervisor(
        command,
        host=args.host,
        port=args.port,
        restart_wait=args.restart_wait,
        drain_timeout=args.drain_timeout,
    ).run()


# --------------------------------------------------------------------------------------- driving it from Python
def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class ServerHandle:
    url: str
    process: subprocess.Popen
    log_path: Path | None = None

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the server (vLLM shuts its engine down), SIGKILL its process group if it hangs."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def wait_healthy(
    url: str,
    process: subprocess.Popen | None,
    timeout: float,
    progress: Callable[[float], None] | None = None,
) -> None:
    """Poll ``url``/health until it answers 200; ``progress(seconds waited)`` is called about once a second."""
    started = time.monotonic()
    deadline = started + timeout
    while time.monotonic() < deadline:
        if progress is not None:
            progress(time.monotonic() - started)
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(1.0)
    raise TimeoutError(f"the server at {url} was not healthy after {timeout:.0f} s")


def start_server(
    serve_args: list[str] | tuple[str, ...] = (),
    *,
    port: int | None = None,
    host: str = "127.0.0.1",
    env: dict[str, str] | None = None,
    log_path: str | Path | None = None,
    timeout: float = 600.0,
    progress: Callable[[float], None] | None = None,
) -> ServerHandle:
    """Start ``lk-vllm serve <serve_args>`` in a subprocess (own process group) and wait until it is healthy.

    ``serve_args`` are the command's arguments (--target, --drafter, ..., and ``--`` vLLM flags); host and port
    are added here. Output goes to ``log_path`` (default: inherited). Raises if the server dies or times out.
    """
    port = port or free_port(host)
    serve_args = list(serve_args)
    cut = serve_args.index("--") if "--" in serve_args else len(serve_args)
    argv = [
        sys.executable,
        "-m",
        "lk_vllm.cli",
        "serve",
        *serve_args[:cut],
        "--host",
        host,
        "--port",
        str(port),
        *serve_args[cut:],
    ]
    log_file = open(log_path, "ab") if log_path else None  # noqa: SIM115 - lives as long as the server
    process = subprocess.Popen(
        argv,
        env={**os.environ, **(env or {})},
        stdout=log_file or None,
        stderr=subprocess.STDOUT if log_file else None,
        start_new_session=True,
    )
    url = f"http://{host}:{port}"
    handle = ServerHandle(url=url, process=process, log_path=Path(log_path) if log_path else None)
    try:
        wait_healthy(url, process, timeout, progress)
    except BaseException:
        handle.stop()
        raise
    return handle
