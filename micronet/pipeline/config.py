"""Pipeline configuration: a YAML file of steps, each one workflow call, checked before anything runs.

A step names the command it runs (``run``), the step whose artifact it starts from (``from``), the command's
options (``args``, the same names as on the command line, ``w_bits`` or ``w-bits`` alike, checked against the
workflow's options dataclass) and, when it
produces a model worth a row in the results table, ``row``. Every error names the file and line.

Relative paths in a config (``out``, ``data.data_root``, a checkpoint folder in ``from`` or ``distill_from``)
are relative to the config file's folder, so a config means the same wherever it is run from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from micronet.errors import PipelineError

# run kind -> (micronet subcommand, option that receives the `from` step's directory, needs `from`)
STEP_KINDS: dict[str, tuple[str, str | None, bool]] = {
    "train": ("train", "--init", False),
    "finetune": ("train", "--prune-refine", True),
    "prune": ("prune", "--checkpoint", True),
    "quantize": ("quantize", "--checkpoint", True),
    "fuse": ("fuse", "--checkpoint", True),
    "sensitivity": ("sensitivity", "--checkpoint", True),
}
# options the pipeline sets itself: a step may not override them (compared as _option_key spells them)
_OWNED = {"out", "resume", "checkpoint", "init", "prune_refine", "data", "data_root", "overwrite", "weights"}
DATA_KEYS = ("data", "data_root", "train_subset", "test_subset", "val_fraction", "data_seed")
MEASURE_DEFAULTS: dict[str, Any] = {"onnx": True, "threads": 1, "batch_sizes": [1, 64], "warmup": 3, "repeats": 20,
                                    "exporter": "dynamo", "openvino": True}
_TOP_KEYS = {"name", "out", "data", "measure", "baseline", "steps"}
_STEP_KEYS = {"name", "run", "from", "args", "row", "skip_from", "distill_from", "model", "weights"}
_ROW_KEYS = {"type", "w_bits", "a_bits", "pack"}


class _LineLoader:
    """A YAML SafeLoader whose mappings remember the line they start on (for error messages)."""

    @staticmethod
    def load(text: str, path: Path) -> Any:
        import yaml

        class Loader(yaml.SafeLoader):
            pass

        def construct_mapping(loader: Loader, node: Any, deep: bool = False) -> dict:
            mapping = _Located(yaml.SafeLoader.construct_mapping(loader, node, deep=True))
            mapping.line = node.start_mark.line + 1
            return mapping

        Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
        try:
            return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "somewhere"
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise PipelineError(f"{path}: YAML error at {where}: {problem}") from None


class _Located(dict):
    line: int = 0


@dataclass
class Step:
    """One pipeline step: a micronet command and where its output goes."""

    name: str
    run: str
    source: str | None
    args: dict[str, Any]
    row: dict[str, Any] | None
    line: int
    skip_from: str | None = None  # a sensitivity step whose skip list this quantize step keeps in float
    distill_from: str | None = None  # an earlier step (or checkpoint folder) this training step distills from
    model: str | None = None  # the user's own MODULE:CALLABLE (a .py path made absolute), in place of `from`
    weights: str | None = None  # its state dict file (absolute)

    @property
    def command(self) -> str:
        return STEP_KINDS[self.run][0]


@dataclass
class PipelineConfig:
    """A parsed and checked pipeline file."""

    name: str
    path: Path
    out: Path
    data: dict[str, Any]
    measure: dict[str, Any]
    steps: list[Step]
    baseline: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    def step(self, name: str) -> Step:
        return next(step for step in self.steps if step.name == name)

    @property
    def rows(self) -> list[Step]:
        return [step for step in self.steps if step.row is not None]

    def step_dir(self, name: str) -> Path:
        """A step's folder; a `from` that is not a step name is a checkpoint folder given by path."""
        if name in {step.name for step in self.steps}:
            return self.out / name
        return Path(name)

    def is_step(self, name: str) -> bool:
        return name in {step.name for step in self.steps}


def _option_key(key: object) -> str:
    """``--data-root``, ``data-root`` and ``data_root`` name the same option."""
    return str(key).lstrip("-").replace("-", "_")


def _relative_to_config(path: Path, value: object) -> str:
    """A path written in the config file at ``path``: relative ones are relative to the file's folder."""
    target = Path(str(value)).expanduser()
    return str(target if target.is_absolute() else Path(os.path.normpath(path.parent / target)))


def _is_checkpoint_folder(source: object) -> bool:
    from micronet.engine.checkpoint import META_FILE

    folder = Path(str(source)).expanduser()
    return any((candidate / META_FILE).is_file() for candidate in (folder, folder / "best"))


def _fail(path: Path, line: int, message: str) -> PipelineError:
    return PipelineError(f"{path}, line {line}: {message}")


def _unknown(keys: set[str], allowed: set[str]) -> list[str]:
    return sorted(str(key) for key in keys - allowed)


def load_config(path: str | Path, *, out: str | Path | None = None) -> PipelineConfig:
    """Read and check a pipeline YAML; every step's command line is parsed before any step runs."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"pipeline config {path} does not exist: pass a YAML file such as configs/default.yaml")
    raw = _LineLoader.load(path.read_text(), path)
    if not isinstance(raw, dict):
        raise PipelineError(f"{path}: a pipeline config is a YAML mapping with `name` and `steps`")
    line = getattr(raw, "line", 1)
    extra = _unknown(set(raw), _TOP_KEYS)
    if extra:
        raise _fail(path, line, f"unknown key(s) {', '.join(extra)}: allowed are {', '.join(sorted(_TOP_KEYS))}")
    name = str(raw.get("name") or path.stem)
    data = dict(raw.get("data") or {})
    if data.get("data_root") is not None:
        data["data_root"] = _relative_to_config(path, data["data_root"])
    extra = _unknown(set(data), set(DATA_KEYS))
    if extra:
        raise _fail(path, getattr(raw.get("data"), "line", line),
                    f"unknown data option(s) {', '.join(extra)}: allowed are {', '.join(DATA_KEYS)}")
    measure = {**MEASURE_DEFAULTS, **dict(raw.get("measure") or {})}
    extra = _unknown(set(measure), set(MEASURE_DEFAULTS))
    if extra:
        raise _fail(path, getattr(raw.get("measure"), "line", line),
                    f"unknown measure option(s) {', '.join(extra)}: allowed are {', '.join(MEASURE_DEFAULTS)}")
    steps = _parse_steps(raw.get("steps"), path, line)
    folder = Path(out) if out else Path(_relative_to_config(path, raw.get("out") or f"runs/{name}"))
    config = PipelineConfig(name=name, path=path, out=folder, data=data,
                            measure=measure, steps=steps, baseline=raw.get("baseline"), raw=dict(raw))
    if config.baseline is not None and config.baseline not in {s.name for s in config.rows}:
        raise _fail(path, line, f"baseline {config.baseline!r} is not a step with a `row`")
    _check_data(config)
    for step in steps:
        step_options(config, step)  # every step's options check out before anything runs
    return config


def _parse_steps(items: Any, path: Path, line: int) -> list[Step]:
    if not isinstance(items, list) or not items:
        raise _fail(path, line, "`steps` must be a non-empty list of steps (each with `name` and `run`)")
    steps: list[Step] = []
    for item in items:
        item_line = getattr(item, "line", line)
        if not isinstance(item, dict):
            raise _fail(path, item_line, f"a step is a mapping with `name` and `run` (got {item!r})")
        extra = _unknown(set(item), _STEP_KEYS)
        if extra:
            raise _fail(path, item_line, f"unknown step key(s) {', '.join(extra)}: allowed are {', '.join(sorted(_STEP_KEYS))}")
        name, kind = item.get("name"), item.get("run")
        if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
            raise _fail(path, item_line, f"step name {name!r} must be letters, digits, - and _ (it names a folder)")
        if name in {s.name for s in steps}:
            raise _fail(path, item_line, f"two steps are named {name!r}: step names must be unique")
        if kind not in STEP_KINDS:
            raise _fail(path, item_line, f"step {name!r}: unknown step kind {kind!r}: choose one of {', '.join(STEP_KINDS)}")
        source = item.get("from")
        model, weights = _user_model(item, kind, name, path, item_line)
        needs_source = STEP_KINDS[kind][2] and model is None
        if needs_source and source is None:
            raise _fail(path, item_line, f"step {name!r} ({kind}) needs `from: <an earlier step>`")
        earlier = {s.name: s for s in steps}
        if source is not None and source not in earlier:
            written, source = source, _relative_to_config(path, source)
        if source is not None and source not in earlier and not _is_checkpoint_folder(source):
            raise _fail(path, item_line, f"step {name!r}: `from: {written}` is neither an earlier step "
                                         f"(earlier: {', '.join(earlier) or 'none'}) nor an existing checkpoint folder")
        if kind == "finetune" and source in earlier and earlier[source].run != "prune":
            raise _fail(path, item_line, f"step {name!r}: finetune starts from a prune step, not {source!r}")
        args = dict(item.get("args") or {})
        owned = sorted(str(key) for key in args if _option_key(key) in _OWNED)
        if owned:
            raise _fail(path, item_line, f"step {name!r}: the pipeline sets {', '.join(owned)} itself "
                                         "(data options go in the top-level `data:`; `from` names the input step)")
        row = item.get("row")
        if isinstance(row, str):
            row = {"type": row}
        if row is not None:
            if not isinstance(row, dict) or "type" not in row or _unknown(set(row), _ROW_KEYS):
                raise _fail(path, item_line, f"step {name!r}: `row` is a type name or a mapping with keys "
                                             f"{', '.join(sorted(_ROW_KEYS))} (type required)")
            if kind in ("prune", "sensitivity"):
                raise _fail(path, item_line, f"step {name!r}: a {kind} step makes no model for the table; "
                                             "put the row on the step that fine-tunes or quantizes it")
        skip_from = item.get("skip_from")
        if skip_from is not None:
            if kind != "quantize" or "skip" in map(_option_key, args):
                raise _fail(path, item_line, f"step {name!r}: skip_from belongs to a quantize step without args.skip")
            if skip_from not in earlier or earlier[skip_from].run != "sensitivity":
                raise _fail(path, item_line, f"step {name!r}: skip_from: {skip_from} is not an earlier sensitivity step")
        distill_from = item.get("distill_from")
        if distill_from is not None and distill_from not in earlier:
            written, distill_from = distill_from, _relative_to_config(path, distill_from)
        if distill_from is not None:
            if kind not in ("train", "finetune", "quantize") or "distill" in map(_option_key, args):
                raise _fail(path, item_line, f"step {name!r}: distill_from belongs to a train, finetune or quantize "
                                             "step without args.distill")
            if distill_from not in earlier and not _is_checkpoint_folder(distill_from):
                raise _fail(path, item_line, f"step {name!r}: `distill_from: {written}` is neither an earlier step "
                                             "nor an existing checkpoint folder")
        steps.append(Step(name=name, run=kind, source=source, args=args, row=dict(row) if row else None, model=model,
                          weights=weights,
                          line=item_line, skip_from=skip_from, distill_from=distill_from))
    return steps


def _user_model(item: dict, kind: str, name: str, path: Path, line: int) -> tuple[str | None, str | None]:
    """A step's ``model: MODULE:CALLABLE`` and ``weights: FILE`` (the user's own network in place of ``from``),
    with a ``.py`` module and the weights file relative to the config file's folder."""
    model, weights = item.get("model"), item.get("weights")
    if model is None and weights is None:
        if ":" in str((item.get("args") or {}).get("model", "")):
            raise _fail(path, line, f"step {name!r}: put your own model in the step's `model:` key (a .py path there "
                                    "is relative to the config file), not in args")
        return None, None
    if not isinstance(model, str) or ":" not in model:
        raise _fail(path, line, f"step {name!r}: `model` is your own network as MODULE:CALLABLE (e.g. nets.py:Net), "
                                f"with `weights: FILE` (got model {model!r})")
    if item.get("from") is not None or kind == "finetune":
        raise _fail(path, line, f"step {name!r}: `model` names the model a {kind} step starts from, and so does "
                                "`from`: keep one (a finetune step always starts from its prune step)")
    if "model" in map(_option_key, item.get("args") or {}):
        raise _fail(path, line, f"step {name!r}: the model is named twice (`model` and args.model): keep the step's `model`")
    if weights is None and kind != "train":
        raise _fail(path, line, f"step {name!r}: a {kind} step reads a trained model: add `weights: FILE` beside `model`")
    module, _, builder = model.rpartition(":")
    if module.endswith(".py") or "/" in module:
        model = f"{_relative_to_config(path, module)}:{builder}"
    if weights is not None:
        weights = _relative_to_config(path, weights)
        if not Path(weights).is_file():
            raise _fail(path, line, f"step {name!r}: weights file {weights} does not exist")
    return model, weights


def _check_data(config: PipelineConfig) -> None:
    """Refuse a config whose dataset cannot be read, before any training starts."""
    name = config.data.get("data", "fashion-mnist")
    if name == "cifar10":
        root = config.data.get("data_root")
        if not root or not Path(str(root)).expanduser().is_dir():
            raise PipelineError(f"{config.path}: the config asks for CIFAR-10 but data_root {root!r} is not a folder: "
                                "download and extract cifar-10-python.tar.gz and set data: {data_root: <folder>}")


def _flag(key: str) -> str:
    return key if key.startswith("-") else f"--{key}"


def _option_words(key: str, value: Any) -> list[str]:
    if value is None or value is False:
        return []
    if value is True:
        return [_flag(key)]
    if isinstance(value, (list, tuple)):
        return [_flag(key), *map(str, value)]
    return [_flag(key), str(value)]


def _options_class(step: Step) -> type:
    from micronet.workflows import VERBS

    return VERBS[step.command][0]


def _step_values(config: PipelineConfig, step: Step) -> dict[str, Any]:
    """The options of ``step`` as named in the config: its output folder, input step and data options filled in."""
    from micronet.workflows.options import key_name, spellings

    command, source_option, _ = STEP_KINDS[step.run]
    values: dict[str, Any] = {}
    if command in ("quantize", "sensitivity") and step.args.get("method") is None:
        raise _fail(config.path, step.line, f"step {step.name!r}: {step.run} needs args.method (iao, dorefa or wbwtab)")
    if step.source is not None and source_option:
        values[source_option] = str(config.step_dir(step.source))
    if step.model is not None:
        values["--model"] = step.model
    if step.weights is not None:
        values["--weights"] = step.weights
    values["--out"] = str(config.step_dir(step.name))
    accepted = spellings(_options_class(step))
    data = {"data": config.data.get("data", "fashion-mnist"), **config.data}
    values.update({key: value for key, value in data.items() if key_name(key) in accepted})
    if step.skip_from is not None:
        values["--skip"] = [str(config.step_dir(step.skip_from) / "skip.txt")]
    if step.distill_from is not None:
        values["--distill"] = str(config.step_dir(step.distill_from))
    values.update(step.args)
    return values


def step_options(config: PipelineConfig, step: Step, *, resume: Path | None = None) -> tuple[Any, set[str]]:
    """(the workflow options of ``step``, the names of those it sets), checked by the options' own types: an
    unknown option or a value the command line would refuse fails here, naming the step and its line.
    ``resume``: continue the interrupted run in that folder."""
    from micronet.engine.distributed import parse_gpu_ids
    from micronet.errors import ConfigError
    from micronet.workflows.options import options_from_mapping

    values = _step_values(config, step)
    if resume is not None:
        values["--resume"] = str(resume)
    try:
        options, given = options_from_mapping(_options_class(step), values, command=step.command)
        if len(parse_gpu_ids(getattr(options, "gpu_id", None))) > 1:
            raise ConfigError("a pipeline runs its steps in one process: give gpu_id one GPU")
    except ConfigError as error:
        raise _fail(config.path, step.line, f"step {step.name!r}: {error}") from None
    return options, given


def step_argv(config: PipelineConfig, step: Step) -> list[str]:
    """The ``micronet`` command line that does what ``step`` does: shown in the log and the step's record, and
    hashed into its fingerprint. (The step itself calls the workflow with :func:`step_options`.)"""
    command = STEP_KINDS[step.run][0]
    argv = [command]
    if command in ("quantize", "sensitivity"):
        argv.append(str(step.args.get("method")))
    for key, value in _step_values(config, step).items():
        if key != "method":
            argv += _option_words(str(key), value)
    return argv
