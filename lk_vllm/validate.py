"""``lk-vllm validate``: the drafter doctor. Finds, before any traffic, what makes a drafter serve badly or not
at all, and says so in one line.

Static checks (no engine; ``lk-vllm serve`` runs them before the engine starts and ``lk-vllm train`` after its
exports, and refuses on an error):

* ``format``: the directory is a drafter checkpoint of a known architecture that loads as vLLM 0.32 reads it
  (config keys, tensor names and shapes, an intact safetensors file: ``lk_vllm.drafters``), and vLLM serves it
  with ``--num-speculative-tokens``.
* ``aux_layers`` (EAGLE-3): the target layers whose hidden states feed the drafter are named where BOTH of
  vLLM 0.32's model runners look (V1: top-level ``eagle_aux_hidden_state_layer_ids`` or
  ``eagle_config.eagle_aux_hidden_state_layer_ids``; V2, its GPU default for EAGLE-3: the top-level key or
  ``eagle_config.layer_ids``). Where a runner finds none it silently uses its guess (2, L/2, L-3): acceptance
  collapses with nothing in the logs, so that is an error here. The ids must be distinct, within 0..L for the
  target, and the layers the trainer used (``lk_training.json``).
* ``fc_width`` (EAGLE-3): the input width of the ``fc`` layer vLLM builds (``target_hidden_size`` x
  ``num_aux_hidden_states``, vllm/model_executor/models/llama_eagle3.py) equals the saved weight's and what the
  target delivers (aux layers x its hidden size).
* ``target``: vocabulary, hidden size and target fingerprint against the target (``check_drafter_matches_target``).
* ``vocabulary``: the draft-to-target map (EAGLE-3 ``d2t``, Medusa ``token_map``) lies inside the target's.
* ``dtype``: one float dtype vLLM can cast to the serving dtype, no NaN or infinite weight.

The probe (``--probe``, on by default in this command): the drafter is served in vLLM on a few prompts at
temperature 0 (``lk_vllm.bench.runner.evaluate_vllm``) and refused when its position-0 acceptance is below
``--min-acceptance`` or below ``--min-fraction-of-prediction`` of the trainer's own prediction (the top-1
agreement at position 0 in ``lk_training.json``: on its eval data of the probe's dataset when it has some, else
on its held-out samples; ``lk_vllm.acceptance.predicted_rates``). The static checks cannot see a drafter trained on
other layers than it claims, or on nothing at all; the probe can.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from lk_vllm.acceptance import predicted_rates
from lk_vllm.assets import resolve_target
from lk_vllm.bench.runner import evaluate_vllm
from lk_vllm.datasets import chat_prompt_ids, load_prompts
from lk_vllm.drafters import detect_architecture, drafter_class, speculative_config_for
from lk_vllm.drafters.base import (
    BEST_EXPORT,
    CONFIG_FILE,
    FINAL_EXPORT,
    TrainingRecord,
    check_drafter_matches_target,
    read_drafter_files,
    read_safetensors_header,
    validate_draft_to_target,
)
from lk_vllm.errors import UserError, require_at_least
from lk_vllm.targets import TargetShape, add_target_argument, serving_problem

OK, WARNING, ERROR = "ok", "warning", "error"
AUX_KEY = "eagle_aux_hidden_state_layer_ids"
_FLOAT_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


@dataclasses.dataclass(frozen=True)
class Finding:
    check: str
    status: str  # ok, warning or error
    message: str


@dataclasses.dataclass
class Report:
    drafter: str
    target: str | None = None
    architecture: str | None = None
    findings: list[Finding] = dataclasses.field(default_factory=list)
    probe: dict[str, Any] | None = None
    record: TrainingRecord = dataclasses.field(
        default_factory=TrainingRecord
    )  # the drafter's lk_training.json

    def add(self, check: str, status: str, message: str) -> None:
        self.findings.append(Finding(check, status, message))

    @property
    def ok(self) -> bool:
        return not any(f.status == ERROR for f in self.findings)

    @property
    def reason(self) -> str | None:
        """The first error, in one line (what serve and train refuse with)."""
        return next((f.message for f in self.findings if f.status == ERROR), None)

    def as_json(self) -> dict[str, Any]:
        return {
            "drafter": self.drafter,
            "target": self.target,
            "architecture": self.architecture,
            "ok": self.ok,
            "reason": self.reason,
            "findings": [dataclasses.asdict(f) for f in self.findings],
            "probe": self.probe,
        }

    def lines(self) -> list[str]:
        head = f"drafter {self.drafter} ({self.architecture or 'unknown format'})"
        out = [head + (f" for target {self.target}" if self.target else "")]
        out += [f"  {f.status:<8}{f.check:<12}{f.message}" for f in self.findings]
        out.append("OK" if self.ok else f"FAILED: {self.reason}")
        return out


# ------------------------------------------------------------------------------------------------ static checks
def check_drafter(directory: str | Path, target: str | None, num_speculative_tokens: int = 3) -> Report:
    """Every static check on a drafter directory, against ``target`` (a resolved target path or HF id; None:
    the checks that need no target only)."""
    path = Path(directory).expanduser()
    report = Report(str(path), target)
    try:
        if not path.is_dir():
            raise UserError(
                f"drafter {path}: expected a drafter checkpoint directory, found "
                f"{'a file' if path.exists() else 'nothing'}"
            )
        files = read_drafter_files(path)
        config = files.config
        report.architecture = detect_architecture(config, f"drafter {path}")
        drafter = drafter_class(report.architecture).from_pretrained(path)
        record = report.record = files.record
        header = _weights_header(path)
        speculative_config_for(path, num_speculative_tokens)  # servable, and with this many tokens
    except (UserError, ValueError, TypeError, KeyError) as exc:  # a config vLLM could not read either
        report.add("format", ERROR, str(exc) if isinstance(exc, UserError) else f"drafter {path}: {exc!r}")
        return report
    report.add("format", OK, f"{_format_name(config, report.architecture)}, loads as vLLM 0.32 reads it")
    shape = None
    if target is not None:
        try:
            shape = TargetShape.read(target)
            check_drafter_matches_target(path, drafter, shape)
            problem = serving_problem(shape, report.architecture)
            if problem:
                raise UserError(problem)
            if not record.target_fingerprint:
                fingerprint = "; no target fingerprint recorded (not made by lk-vllm), so sizes only"
            elif not Path(target).is_dir():
                fingerprint = "; an HF id has no fingerprint to compare, so sizes only"
            else:
                fingerprint = ", fingerprint matches"
            report.add(
                "target", OK, f"vocabulary {shape.vocab_size}, hidden size {shape.hidden_size}{fingerprint}"
            )
        except UserError as exc:
            report.add("target", ERROR, str(exc))
    if report.architecture == "eagle3":
        _check_eagle3(report, path, config, header, record, shape)
    _check_vocabulary(report, path, drafter, shape)
    _check_dtype(report, path, header, drafter, shape)
    return report


def _weights_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:

    header: dict[str, tuple[str, tuple[int, ...]]] = {}
    for weights in sorted(path.glob("*.safetensors")):
        header.update(read_safetensors_header(weights))
    return header


def _format_name(config: dict, architecture: str) -> str:
    if architecture == "eagle3":
        return (
            "EAGLE-3, speculators format" if config.get("speculators_model_type") else "EAGLE-3, plain config"
        )
    return {"medusa": "Medusa", "mlp_speculator": "MLP speculator", "draft_model": "draft LM"}[architecture]


def vllm_eagle3_config(config: dict) -> dict:
    """The draft model config vLLM 0.32 builds from an EAGLE-3 config.json: the file itself, or for the
    speculators format its ``transformer_layer_config`` with the EAGLE-3 fields vLLM copies over
    (vllm/transformers_utils/configs/speculators/algos.py ``update_eagle3``; nothing else is copied)."""
    if not (config.get("speculators_model_type") or "speculators_config" in config):
        return config
    view = dict(config.get("transformer_layer_config") or {})
    view["draft_vocab_size"] = config.get("draft_vocab_size")
    if config.get("target_hidden_size") is not None:
        view["target_hidden_size"] = config["target_hidden_size"]
    if config.get(AUX_KEY):
        view[AUX_KEY] = config[AUX_KEY]
    return view


def aux_layer_ids_by_runner(view: dict) -> dict[str, list | None]:
    """The aux layer ids each vLLM 0.32 model runner takes from the draft config, None where it finds none
    (vllm/v1/worker/gpu_model_runner.py ``_get_eagle3_aux_layers_from_config`` and
    vllm/v1/worker/gpu/spec_decode/eagle/eagle3_utils.py ``get_eagle3_aux_layers_from_config``)."""
    eagle_config = view.get("eagle_config") if isinstance(view.get("eagle_config"), dict) else {}
    top = view.get(AUX_KEY) or None
    return {
        "V1": top or eagle_config.get(AUX_KEY) or None,
        "V2": top or eagle_config.get("layer_ids") or None,
    }


def _check_eagle3(
    report: Report, path: Path, config: dict, header: dict, record: TrainingRecord, target: TargetShape | None
) -> None:
    view = vllm_eagle3_config(config)
    rope = view.get("rope_parameters")
    if isinstance(rope, dict) and any(isinstance(v, dict) for v in rope.values()):
        report.add(
            "format",
            ERROR,
            f"drafter {path}: rope_parameters is nested per layer type "
            f"({', '.join(sorted(rope))}); vLLM's Llama layer reads one flat set (rope_type, rope_theta, ...)",
        )
        return
    by_runner = aux_layer_ids_by_runner(view)
    trained = record.aux_layer_ids
    layers = target.num_layers if target else None
    guess = (2, layers // 2, layers - 3) if layers else "(2, L/2, L-3)"
    trained_note = f"; it was trained on {trained}" if trained else ""
    ids = by_runner["V1"] or by_runner["V2"]
    if ids is None:
        report.add(
            "aux_layers",
            ERROR,
            f"drafter {path}: config.json names no EAGLE-3 auxiliary layers "
            f"({AUX_KEY}), so vLLM 0.32 silently uses its guess {guess}{trained_note}; add them to config.json",
        )
        return
    missing = [runner for runner, found in by_runner.items() if found is None]
    if missing:
        where = {"V1": f"top-level {AUX_KEY} or eagle_config.{AUX_KEY}", "V2": f"top-level {AUX_KEY}"}[
            missing[0]
        ]
        report.add(
            "aux_layers",
            ERROR,
            f"drafter {path}: vLLM 0.32's {missing[0]} model runner "
            f"({'its GPU default for EAGLE-3' if missing[0] == 'V2' else 'used on CPU'}) reads the "
            f"auxiliary layers only from {where}, which config.json lacks, and would silently use its "
            f"guess {guess} instead of {list(ids)}; add a top-level {AUX_KEY}",
        )
        return
    if list(by_runner["V1"]) != list(by_runner["V2"]):
        report.add(
            "aux_layers",
            ERROR,
            f"drafter {path}: vLLM 0.32's V1 and V2 model runners read different "
            f"auxiliary layers from config.json ({by_runner['V1']} and {by_runner['V2']})",
        )
        return
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        report.add("aux_layers", ERROR, f"drafter {path}: {AUX_KEY} must be integers, found {ids}")
        return
    problems = []
    if len(set(ids)) != len(ids):
        problems.append(f"expected distinct layer ids, found {ids}")
    if layers is not None and any(not 0 <= i <= layers for i in ids):
        problems.append(f"expected ids within 0..{layers} for this {layers}-layer target, found {ids}")
    if trained is not None and sorted(ids) != sorted(trained):
        problems.append(f"config.json names layers {ids}, but the trainer used {trained} (lk_training.json)")
    if problems:
        report.add("aux_layers", ERROR, f"drafter {path}: auxiliary layers: {'; '.join(problems)}")
    else:
        report.add(
            "aux_layers",
            OK,
            f"{list(ids)}, read alike by vLLM's V1 and V2 runners"
            + (", as trained" if trained else "; no record of the layers it was trained on"),
        )
    _check_fc_width(report, path, view, header, ids, target)


def _check_fc_width(
    report: Report, path: Path, view: dict, header: dict, ids: list[int], target: TargetShape | None
) -> None:
    eagle_config = view.get("eagle_config") if isinstance(view.get("eagle_config"), dict) else {}
    # vLLM's count: num_aux_hidden_states, else the ids in eagle_config (not the top-level ones), else 3.
    count = view.get("num_aux_hidden_states") or (
        len(eagle_config[AUX_KEY]) if eagle_config.get(AUX_KEY) else 3
    )
    target_hidden = int(view.get("target_hidden_size") or view["hidden_size"])
    width = target_hidden * int(count)
    built = f"vLLM 0.32 builds fc for {width} inputs (target_hidden_size {target_hidden} x {count} auxiliary states)"
    weight = next((header[name] for name in ("fc.weight", "model.fc.weight") if name in header), None)
    if weight is None or tuple(weight[1]) != (int(view["hidden_size"]), width):
        found = "no fc.weight" if weight is None else f"fc.weight of shape {list(weight[1])}"
        report.add("fc_width", ERROR, f"drafter {path}: {built}, but model.safetensors has {found}")
    elif target is not None and len(ids) * target.hidden_size != width:
        report.add(
            "fc_width",
            ERROR,
            f"drafter {path}: {built}, but the target delivers {len(ids)} auxiliary "
            f"states of {target.hidden_size} = {len(ids) * target.hidden_size}",
        )
    else:
        report.add("fc_width", OK, f"{width} = {count} x {target_hidden}, as saved")


def _check_vocabulary(report: Report, path: Path, drafter, target: TargetShape | None) -> None:

    mapping = drafter.draft_to_target
    vocab = target.vocab_size if target else drafter.target_vocab_size()
    if mapping is None:
        report.add("vocabulary", OK, f"the full vocabulary ({drafter.target_vocab_size()} tokens)")
        return
    try:
        validate_draft_to_target(mapping, drafter.draft_vocab_size, vocab, f"drafter {path}")
    except UserError as exc:
        report.add("vocabulary", ERROR, str(exc))
        return
    report.add("vocabulary", OK, f"{drafter.draft_vocab_size} draft tokens mapped into the target's {vocab}")


def _check_dtype(report: Report, path: Path, header: dict, drafter, target: TargetShape | None) -> None:
    import torch

    floats = sorted({dtype for dtype, _ in header.values() if dtype.startswith(("F", "BF"))})
    unsupported = [d for d in floats if d not in _FLOAT_DTYPES]
    bad = next(
        (
            name
            for name, t in drafter.state_dict().items()
            if t.is_floating_point() and not torch.isfinite(t).all()
        ),
        None,
    )
    if unsupported:
        report.add(
            "dtype",
            ERROR,
            f"drafter {path}: expected float32, bfloat16 or float16 weights, found {', '.join(unsupported)}",
        )
    elif bad is not None:
        report.add("dtype", ERROR, f"drafter {path}: weight {bad} has NaN or infinite values")
    else:
        names = [_FLOAT_DTYPES[d] for d in floats]
        cast = (
            f"; vLLM casts it to the serving dtype ({target.dtype} by the target's config)"
            if target and target.dtype and names != [target.dtype]
            else ""
        )
        report.add(
            "dtype",
            WARNING if len(names) > 1 else OK,
            f"{' and '.join(names) or 'no float weights'}{' (mixed)' if len(names) > 1 else ''}{cast}",
        )


def require_valid(
    directory: str | Path, target: str | None, num_speculative_tokens: int, flag: str
) -> Report:
    """The static checks, as a gate: a one-line UserError naming ``flag`` on the first error."""
    report = check_drafter(directory, target, num_speculative_tokens)
    if not report.ok:
        raise UserError(
            f"{flag} {directory}: {report.reason} (`lk-vllm validate {directory}` for every check)"
        )
    return report


def check_exports(run_dir: Path, num_speculative_tokens: int) -> None:
    """After ``lk-vllm train``: the static checks on each export of the run (against the target it records),
    one line each; the first error is a one-line UserError."""
    for directory in (run_dir / FINAL_EXPORT, run_dir / BEST_EXPORT):
        if directory.is_dir():
            require_valid(directory, _default_target(directory), num_speculative_tokens, "exported drafter")
            print(
                f"validated {directory}: static checks passed (`lk-vllm validate {directory}` also probes it "
                "in vLLM)",
                file=sys.stderr,
            )


# ------------------------------------------------------------------------------------------------------- probe
@dataclasses.dataclass(frozen=True)
class ProbeSettings:
    prompts: int = 4
    max_tokens: int = 48
    dataset: str = "mtbench"
    # An untrained or mis-wired EAGLE-3 head on SmolLM2 sits at a few percent; a working one far above.
    min_acceptance: float = 0.1
    min_fraction_of_prediction: float = 0.5

    def __post_init__(self) -> None:
        if self.prompts < 1:
            raise UserError(f"--probe-prompts: expected an integer >= 1, found {self.prompts}")
        if self.max_tokens < 2:
            raise UserError(f"--probe-max-tokens: expected an integer >= 2, found {self.max_tokens}")
        if not 0.0 <= self.min_acceptance <= 1.0:
            raise UserError(f"--min-acceptance: expected a rate in [0, 1], found {self.min_acceptance}")
        if not 0.0 < self.min_fraction_of_prediction <= 1.0:
            raise UserError(
                "--min-fraction-of-prediction: expected a fraction in (0, 1], found "
                f"{self.min_fraction_of_prediction}"
            )


def judge_probe(summary: dict[str, Any], record: TrainingRecord, settings: ProbeSettings) -> Finding:
    """The probe's verdict from its counters (``Counts.summary()`` of ``evaluate_vllm``) and the drafter's
    training record."""
    rates = summary.get("per_position_acceptance")
    if not summary.get("num_drafts") or not rates:
        return Finding(
            "probe",
            ERROR,
            f"the probe made no drafts on {settings.prompts} prompt(s) of "
            f"{settings.max_tokens} tokens; raise --probe-max-tokens",
        )
    observed = float(rates[0])
    prediction = predicted_rates(record.training, 0.0, 1, settings.dataset)
    predicted, source = (prediction[0][0], prediction[1]) if prediction else (None, None)
    said = f"position-0 acceptance {observed:.3f} over {summary['num_drafts']} drafts at T=0"
    expected = f", the trainer's prediction is {predicted:.3f} ({source})" if predicted is not None else ""
    if observed < settings.min_acceptance:
        return Finding(
            "probe", ERROR, f"{said} is below the floor --min-acceptance {settings.min_acceptance}{expected}"
        )
    if predicted is not None and observed < settings.min_fraction_of_prediction * predicted:
        return Finding(
            "probe",
            ERROR,
            f"{said} is far below the trainer's prediction {predicted:.3f} ({source}) "
            f"(under --min-fraction-of-prediction {settings.min_fraction_of_prediction} of it)",
        )
    return Finding("probe", OK, f"{said}{expected}; acceptance length {summary['acceptance_length']:.3f}")


def run_probe(
    directory: Path, target: str, num_speculative_tokens: int, settings: ProbeSettings
) -> dict[str, Any]:
    """Serve the drafter in vLLM on the first prompts of a dataset; its counters (``Counts.summary()``)."""
    from transformers import AutoTokenizer

    prompts = load_prompts(settings.dataset, split="eval", limit=settings.prompts)
    tokenizer = AutoTokenizer.from_pretrained(target)
    ids = [chat_prompt_ids(tokenizer, prompt.messages) for prompt in prompts]
    counts = evaluate_vllm(
        str(directory), target, {"probe": ids}, num_speculative_tokens, settings.max_tokens, 0.0
    )
    return counts["probe"].summary()


def validate(
    directory: str | Path,
    target: str | None,
    num_speculative_tokens: int = 3,
    probe: ProbeSettings | None = None,
) -> Report:
    """The static checks, then (with ``probe``, and only if they pass) the served probe."""
    report = check_drafter(directory, target, num_speculative_tokens)
    if probe is not None and report.ok and target is not None:
        summary = run_probe(Path(report.drafter), target, num_speculative_tokens, probe)
        report.probe = {
            "dataset": probe.dataset,
            "prompts": probe.prompts,
            "max_tokens": probe.max_tokens,
            "temperature": 0.0,
            **summary,
        }
        report.findings.append(judge_probe(summary, report.record, probe))
    return report


# ------------------------------------------------------------------------------------------------ command line
def add_arguments(parser) -> None:

    defaults = ProbeSettings()
    parser.add_argument("drafter", metavar="DRAFTER", help="drafter checkpoint directory")
    add_target_argument(
        parser, "the one recorded with the drafter if it is here, else the embedded default target"
    )
    parser.add_argument(
        "--num-speculative-tokens",
        type=int,
        default=3,
        metavar="K",
        help="draft tokens per step to check and probe with (default 3)",
    )
    parser.add_argument(
        "--probe",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="after the static checks, serve the drafter in vLLM on a few prompts (default on)",
    )
    parser.add_argument(
        "--probe-prompts",
        type=int,
        default=defaults.prompts,
        metavar="N",
        help=f"prompts the probe sends (default {defaults.prompts})",
    )
    parser.add_argument(
        "--probe-max-tokens",
        type=int,
        default=defaults.max_tokens,
        metavar="N",
        help=f"tokens generated per probe prompt (default {defaults.max_tokens})",
    )
    parser.add_argument(
        "--probe-dataset",
        default=defaults.dataset,
        metavar="NAME",
        help=f"dataset name or .jsonl file the probe prompts come from (default {defaults.dataset})",
    )
    parser.add_argument(
        "--min-acceptance",
        type=float,
        default=defaults.min_acceptance,
        metavar="RATE",
        help=f"refuse when the probe's position-0 acceptance is below this (default "
        f"{defaults.min_acceptance})",
    )
    parser.add_argument(
        "--min-fraction-of-prediction",
        type=float,
        default=defaults.min_fraction_of_prediction,
        metavar="FRACTION",
        help="refuse when the probe's position-0 acceptance is below this fraction of the trainer's "
        f"prediction in lk_training.json (default {defaults.min_fraction_of_prediction})",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def _default_target(directory: Path) -> str:
    """The target recorded with the drafter when it is on this machine, else the embedded default."""
    recorded = (
        read_drafter_files(directory).record.target_path if (directory / CONFIG_FILE).is_file() else None
    )
    return resolve_target(recorded if recorded and Path(recorded).is_dir() else None)


def run(args) -> int:

    require_at_least("--num-speculative-tokens", args.num_speculative_tokens)
    probe = (
        ProbeSettings(
            args.probe_prompts,
            args.probe_max_tokens,
            args.probe_dataset,
            args.min_acceptance,
            args.min_fraction_of_prediction,
        )
        if args.probe
        else None
    )
    directory = Path(args.drafter).expanduser()
    target = resolve_target(args.target) if args.target else _default_target(directory)
    report = validate(directory, target, args.num_speculative_tokens, probe)
    if args.json:
        print(json.dumps(report.as_json()))
    else:
        print("\n".join(report.lines()))
    return 0 if report.ok else 1
