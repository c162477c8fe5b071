"""Generate, or check, the two pages of Grove's docs that are read off the source.

    python scripts/gen_docs.py --write     # rewrite docs/configuration.md and docs/troubleshooting.md
    python scripts/gen_docs.py --check     # exit 1 with a diff and the problems when either is out of date
    python scripts/gen_docs.py --sites     # list every error site found, with its id (to write an entry)
    python scripts/gen_docs.py --undocumented   # the keys/options described only by this script's tables

docs/configuration.md: every key of `GroveConfig` (trainer/config.py), nested, with its type,
its default as the composed default config gives it (`load_config([])`: the dataclass default
or the YAML file, profile included, that sets it), and a one-line description read from the
source: the field's trailing `# comment`, else the comment lines right above it, else the
YAML comment on that key in configs/. A key with none of them must be described in
`KEY_NOTES` below (the check fails otherwise, and fails too when a note there has become
redundant or names a key that is gone). Then every config group option with the first
sentence of its YAML header comment (or `OPTION_NOTES`) and what it changes.

docs/troubleshooting.md: every error Grove raises on purpose. The error sites are found with
`ast` in buffer/, algorithms/, rewards/, rollout/ and trainer/: each `raise X(<message>)` whose
message is a string literal or f-string (or a concatenation or choice of them), and each
`usage_error(kind, <message>)` call. A site's id is `module:function:exception:first words`
of the message's literal text. The page keeps a hand-written cause and fix for each id;
`--write` re-renders the page from the sites found, keeping those paragraphs (a new site gets
an entry marked TODO; a site that is gone loses its entry), and `--check` fails on a site
without an entry, an entry without a site, an entry still marked TODO, or a page that
differs from what `--write` would write.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import io
import json
import re
import sys
import textwrap
import tokenize
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CONFIG_DIR = ROOT / "configs"
CONFIG_DOC = ROOT / "docs" / "configuration.md"
TROUBLE_DOC = ROOT / "docs" / "troubleshooting.md"
PACKAGES = ("buffer", "algorithms", "rewards", "rollout", "trainer")
TODO = "TODO"

# Keys whose field has no comment in its dataclass and no YAML comment in configs/. Each is
# a description that belongs in the source: move it there (a trailing `# comment` on the
# field) and delete it here; the check says when one has become redundant.
KEY_NOTES: dict[str, str] = {
    "model.path": "an HF model folder (config.json, weights, tokenizer); null builds (or reuses) the built-in tiny model",
    "rollout.engine.max_model_len": "the engine's context length: prompt + response must fit (vLLM's max_model_len)",
    "reward.functions": "the rewards; a sample's reward is the weighted sum of theirs (entries: the reward.functions[] keys below)",
    "cluster.name": "the platform profile's name (configs/cluster/), for logs",
    "logger.wandb": "log to W&B (offline without WANDB_API_KEY); metrics.jsonl is written either way",
    "model.tiny.hidden_size": "width of the built-in model (hidden size / num_heads must be a head size vLLM's CPU kernels accept: 32, 64, 80, ...)",
    "model.tiny.num_layers": "transformer layers of the built-in model",
    "model.tiny.num_heads": "attention heads of the built-in model",
    "model.tiny.num_kv_heads": "key/value heads of the built-in model (grouped-query attention)",
    "model.tiny.intermediate_size": "MLP width of the built-in model",
    "model.tiny.seed": "seed of the built-in model's random initialisation",
    "model.warmup.target_accuracy": "the built-in model's supervised warm-up stops once greedy held-out accuracy reaches this",
    "model.warmup.max_steps": "the warm-up stops after this many steps whatever the accuracy",
    "model.warmup.batch_size": "rows per warm-up step",
    "model.warmup.lr": "warm-up learning rate",
    "model.warmup.eval_every": "the warm-up checks greedy accuracy every this many steps",
    "model.warmup.eval_rows": "held-out rows that accuracy check uses",
    "model.warmup.seed": "seed of the warm-up's data order",
    "task.seed": "seed of the generated arithmetic datasets",
    "task.num_train": "generated tasks: rows in the train split",
    "task.num_eval": "generated tasks: rows in the held-out split",
    "task.ops": "generated tasks: the operators used, as one string (e.g. \"+-*\")",
    "task.max_ops": "arithmetic_steps: the most operations per expression (see task.min_ops)",
    "task.eval_files": "for name=files: the held-out rows, a path or glob (.json, .jsonl or .parquet)",
    "task.prompt_key": "the row field that holds the prompt text (the rest of the row goes to the rewards)",
    "algorithm.novelty_lambda": "XRPO: lambda_nov, the scale of the novelty bonus",
    "algorithm.clip_high": "upper clip: the ratio is clipped to [1 - clip_low, 1 + clip_high] (DAPO's clip-higher raises it)",
    "algorithm.rejection_low": "with algorithm.rejection: tokens/sequences whose ratio is below this leave the loss",
    "algorithm.rejection_high": "with algorithm.rejection: tokens/sequences whose ratio is above this leave the loss",
    "rollout.max_tokens": "the most tokens one response may have (its generation budget)",
    "rollout.temperature": "sampling temperature (> 0); the trainer divides its logits by it too, so importance weights stay exact",
    "rollout.top_p": "must be 1.0: truncated sampling would bias every importance weight (the config check says why)",
    "rollout.eval_max_tokens": "the most tokens of one greedy response in held-out evaluation",
    "rollout.workflow_kwargs": "keyword arguments for the workflow's constructor",
    "rollout.engine.dtype": "the engine's weight dtype: auto, float32, bfloat16, ... (the cluster profile sets it)",
    "rollout.engine.enable_prefix_caching": "vLLM's prefix cache: requests sharing whole blocks of prompt reuse their keys and values",
    "rollout.engine.seed": "the engine's sampling seed",
    "trainer.lr": "learning rate (Adam)",
    "trainer.weight_decay": "Adam weight decay",
    "trainer.adam_beta1": "Adam beta1",
    "trainer.adam_beta2": "Adam beta2",
    "trainer.grad_clip": "gradient norm clipping",
    "trainer.bf16": "train in bf16 (DeepSpeed); the cluster profile sets it (gpu_local: true)",
    "trainer.seed": "the trainer's torch seed",
    "trainer.num_threads": "torch threads in the trainer process (the cluster profile sets it)",
    "reward.failure_score": "on_failure=score: what a failed sample scores",
    "reward.max_consecutive_failures": "on_failure=stop: this many failed samples in a row stop the run (RewardFailureError)",
    "reward.failure_window": "the failure alarm looks at the last this many scored samples",
    "reward.functions[].fn": "the reward: a registered name (exact_match, math_verify, ...), pkg.mod:fn or path/file.py:fn",
    "reward.functions[].weight": "multiplies this reward's score in the sum",
    "reward.functions[].kwargs": "arguments bound to the reward (those that are not dataset fields)",
    "reward.functions[].name": "label in logs (default: the function's name)",
    "reward.functions[].group": "force group mode (the reward scores a whole group at once); null: what its decorator says",
    "sampling.name": "the prompt sampler: a registered name (uniform, dapo_filter, dars, vade, xrpo) or a dotted path",
    "sampling.kwargs": "keyword arguments for the sampler's constructor",
    "eval.max_rows": "held-out rows evaluated (the first this many of the eval split)",
    "logger.project": "W&B project",
    "logger.console": "print the live progress lines (stderr)",
    "logger.samples_per_step": "rows in that table each time",
    "seed": "the run's seed (prompt order; the engines and trainer have their own seeds)",
    "output_root": "runs are written under this folder",
    "run_name": "the run's folder under output_root (default: the start time)",
}

# Config group options whose YAML file has no header comment.
OPTION_NOTES: dict[str, str] = {
    "logger/none": "No W&B: progress lines on the console and metrics.jsonl only.",
    "rollout/default": "The rollout settings of the built-in default (the only option of this group).",
    "trainer/default": "The trainer settings of the built-in default (the only option of this group).",
}

GROUP_ORDER = ("model", "task", "algorithm", "sampling", "rollout", "trainer", "cluster", "logger")


# --------------------------------------------------------------------------------------
# configuration reference
# --------------------------------------------------------------------------------------


@dataclass
class KeyDoc:
    path: str
    type: str
    default: str
    source: str
    description: str
    described_by: str  # "source", "yaml" or "notes"


def _comments(source: str) -> dict[int, tuple[str, bool]]:
    """line -> (comment text, whether it is alone on its line)."""
    out: dict[int, tuple[str, bool]] = {}
    lines = source.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            line = tok.start[0]
            alone = not lines[line - 1][: tok.start[1]].strip()
            text = tok.string.lstrip("#").lstrip(":").strip()
            out[line] = (text, alone)
    return out


def field_comments(cls: type) -> dict[str, str]:
    """Each field's description in `cls`'s source: its trailing comment, else the block of
    comment lines right above it, joined into one line."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments = _comments(source)
    classdef = ast.parse(source).body[0]
    out: dict[str, str] = {}
    for stmt in classdef.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        text, alone = comments.get(stmt.end_lineno, ("", True))
        if text and not alone:
            out[stmt.target.id] = text
            continue
        block, line = [], stmt.lineno - 1
        while line in comments and comments[line][1]:
            block.insert(0, comments[line][0])
            line -= 1
        if block:
            out[stmt.target.id] = " ".join(block)
    return out


def _package_of(text: str) -> str | None:
    match = re.search(r"^# @package (\S+)", text, re.M)
    return match.group(1) if match else None


def _prefix(package: str | None) -> str:
    return "" if package in (None, "_global_") else package + "."


def yaml_comments(path: Path) -> dict[str, str]:
    """dotted key -> the trailing comment on that key's line, in one config file."""
    text = path.read_text()
    prefix = _prefix(_package_of(text))
    out: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in text.splitlines():
        match = re.match(r"^(\s*)([A-Za-z_][\w]*):(.*)$", line)
        if not match:
            continue
        indent, key, rest = len(match.group(1)), match.group(2), match.group(3)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        comment = re.search(r"\s#\s?(.*)$", rest)
        if comment and "'" not in rest.split("#")[0] and '"' not in rest.split("#")[0]:
            out[prefix + ".".join(k for _, k in stack)] = comment.group(1).strip()
    return out


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(data, dict) and data:
        for key, value in data.items():
            if key in ("defaults", "hydra") and not prefix:
                continue
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    out[prefix[:-1]] = data
    return out


def option_values(path: Path) -> dict[str, Any]:
    """dotted key -> raw value (interpolations unresolved) that one config file sets."""
    from omegaconf import OmegaConf

    text = path.read_text()
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    raw.pop("defaults", None)  # group selections, not values
    return _flatten(raw, _prefix(_package_of(text)))


def default_options() -> list[tuple[str, str]]:
    """(group, option) of the default composition, in order, with ("", "config") for the
    primary file's own values (`_self_`)."""
    from omegaconf import OmegaConf

    order = []
    for entry in OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "config.yaml"))["defaults"]:
        if entry == "_self_":
            order.append(("", "config"))
        elif isinstance(entry, dict):
            (group, option), = entry.items()
            order.append((group, option))
    return order


def _option_path(group: str, option: str) -> Path:
    return CONFIG_DIR / "config.yaml" if not group else CONFIG_DIR / group / f"{option}.yaml"


def _label(group: str, option: str) -> str:
    return "config.yaml" if not group else f"{group}/{option}.yaml"


def fmt(value: Any) -> str:
    if value == "???":
        return "??? (required)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if dataclasses.is_dataclass(value):
        return "{" + ", ".join(f"{f.name}: {fmt(getattr(value, f.name))}" for f in dataclasses.fields(value)) + "}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {fmt(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(fmt(v) for v in value) + "]"
    return repr(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _raw_default_config() -> dict[str, Any]:
    """The default composition with interpolations left as written (`${now:...}`)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from trainer.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return _flatten(OmegaConf.to_container(compose(config_name="config"), resolve=False))


def collect_keys() -> tuple[list[tuple[str, type, list[KeyDoc]]], list[str]]:
    """Per top-level section: (name, its dataclass or None, its keys); and the problems."""
    from trainer.cli import load_config
    from trainer.config import GroveConfig

    composed = load_config([])
    raw = _raw_default_config()
    yaml_notes: dict[str, str] = {}
    # YAML comments count from the files of the default composition and the platform
    # profiles only: another option's comments describe its own values, not the key.
    files = [CONFIG_DIR / "config.yaml", *(_option_path(g, o) for g, o in default_options() if g)]
    files += sorted(p for p in (CONFIG_DIR / "cluster").glob("*.yaml") if p not in files)
    for path in files:
        for key, text in yaml_comments(path).items():
            yaml_notes.setdefault(key, text)
    writers: dict[str, list[str]] = {}
    for group, option in default_options():
        for key in option_values(_option_path(group, option)):
            writers.setdefault(key, []).append(_label(group, option))
    profiles = {p.stem: option_values(p) for p in sorted((CONFIG_DIR / "cluster").glob("*.yaml"))}
    problems: list[str] = []
    used_notes: set[str] = set()

    def describe(path: str, comments: dict[str, str], name: str) -> tuple[str, str]:
        if name in comments:
            if path in KEY_NOTES:
                problems.append(f"KEY_NOTES[{path!r}] is redundant: the source now describes it; delete it")
            return comments[name], "source"
        if path in yaml_notes:
            if path in KEY_NOTES:
                problems.append(f"KEY_NOTES[{path!r}] is redundant: configs/ now describes it; delete it")
            return yaml_notes[path], "yaml"
        if path in KEY_NOTES:
            used_notes.add(path)
            return KEY_NOTES[path], "notes"
        problems.append(f"{path}: no description (add a trailing `# comment` to the field in the source)")
        return "", "none"

    def walk(cls: type, obj: Any, prefix: str, out: list[KeyDoc], in_list: bool = False) -> None:
        hints = typing.get_type_hints(cls)
        comments = field_comments(cls)
        for f in dataclasses.fields(cls):
            path, value, hint = prefix + f.name, getattr(obj, f.name), hints[f.name]
            if dataclasses.is_dataclass(hint):
                walk(hint, value, path + ".", out, in_list)
                continue
            text, by = describe(path, comments, f.name)
            if in_list:
                default, source = fmt(value), "schema (each entry)"
            else:
                default = fmt(raw[path]) if isinstance(raw.get(path), str) and "${" in raw[path] else fmt(value)
                source = writers[path][-1] if path in writers else "schema"
                if source.startswith("cluster/"):
                    others = [f"{name}: {fmt(vals[path])}" for name, vals in profiles.items()
                              if path in vals and f"cluster/{name}.yaml" != source and vals[path] != value]
                    source = f"{source} (profile{'; ' + ', '.join(others) if others else ''})"
            out.append(KeyDoc(path, str(f.type), default, source, text, by))
            args = typing.get_args(hint)
            if typing.get_origin(hint) is list and args and dataclasses.is_dataclass(args[0]):
                walk(args[0], args[0](), path + "[].", out, in_list=True)

    sections: list[tuple[str, type, list[KeyDoc]]] = []
    top: list[KeyDoc] = []
    hints = typing.get_type_hints(GroveConfig)
    for f in dataclasses.fields(GroveConfig):
        if dataclasses.is_dataclass(hints[f.name]):
            keys: list[KeyDoc] = []
            walk(hints[f.name], getattr(composed, f.name), f.name + ".", keys)
            sections.append((f.name, hints[f.name], keys))
        else:
            path = f.name
            text, by = describe(path, field_comments(GroveConfig), f.name)
            default = fmt(raw[path]) if isinstance(raw.get(path), str) and "${" in raw[path] else fmt(
                getattr(composed, f.name))
            top.append(KeyDoc(path, str(f.type), default, writers.get(path, ["schema"])[-1], text, by))
    sections.append(("", GroveConfig, top))
    for path in sorted(set(KEY_NOTES) - used_notes):
        if not any(path in p for p in problems):
            problems.append(f"KEY_NOTES[{path!r}] names no config key; delete it")
    return sections, problems


def header_sentence(path: Path) -> str:
    """The first sentence of a config file's header comment (after `# @package`): up to the
    first full stop, or to the end of a line that ends with a colon."""
    text = ""
    for line in path.read_text().splitlines():
        if line.startswith("# @package"):
            continue
        if not line.startswith("#"):
            break
        text = f"{text} {line.lstrip('#').strip()}".strip()
        match = re.search(r"(?<!e\.g)(?<!i\.e)\.(\s|$)", text)
        if match:
            return text[: match.start() + 1]
        if text.endswith(":"):
            return text[:-1] + "."
    return text


def collect_options() -> tuple[list[tuple[str, list[tuple[str, str, str, bool]]]], list[str]]:
    """Per group: (option, description, what it changes against the default, is default)."""
    from omegaconf import OmegaConf

    problems: list[str] = []
    defaults = dict(default_options())
    base: dict[str, Any] = {}
    for group, option in default_options():
        base.update(option_values(_option_path(group, option)))
    groups = sorted((p.name for p in CONFIG_DIR.iterdir() if p.is_dir()),
                    key=lambda g: (GROUP_ORDER.index(g) if g in GROUP_ORDER else len(GROUP_ORDER), g))
    used: set[str] = set()
    out = []
    for group in groups:
        rows = []
        for path in sorted((CONFIG_DIR / group).glob("*.yaml")):
            name = f"{group}/{path.stem}"
            text = header_sentence(path)
            if text and name in OPTION_NOTES:
                problems.append(f"OPTION_NOTES[{name!r}] is redundant: the file now has a header comment; delete it")
            if not text:
                text = OPTION_NOTES.get(name, "")
                used.add(name)
                if not text:
                    problems.append(f"configs/{name}.yaml: no header comment (add one after `# @package`)")
            changes = []
            raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
            for entry in raw.get("defaults", []) if isinstance(raw, dict) else []:
                if isinstance(entry, dict):
                    for key, value in entry.items():
                        target = key.split()[-1].lstrip("/").split("@")[0]
                        changes.append(f"{target}={value}")
            for key, value in option_values(path).items():
                if key not in base or base[key] != value:
                    changes.append(f"{key}={fmt(value)}")
            is_default = defaults.get(group) == path.stem
            rows.append((path.stem, text, ", ".join(changes), is_default))
        out.append((group, rows))
    for name in sorted(set(OPTION_NOTES) - used):
        if not any(name in p for p in problems):
            problems.append(f"OPTION_NOTES[{name!r}] names no config option; delete it")
    return out, problems


def _doc_first_paragraph(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    if doc.startswith(cls.__name__ + "("):  # dataclass's generated signature, not a docstring
        return ""
    return " ".join(doc.split("\n\n")[0].split())


def render_configuration() -> tuple[str, list[str]]:
    sections, problems = collect_keys()
    options, option_problems = collect_options()
    problems += option_problems
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated by scripts/gen_docs.py from trainer/config.py, the dataclasses it gathers and configs/.",
        "     Do not edit: change the source and run `python scripts/gen_docs.py --write`. -->",
        "",
        "Every key of the typed config (`trainer/config.py:GroveConfig`), with its type, its default in the",
        "composed default config (`grove train` with no overrides: the dataclass default, or the YAML file",
        "that sets it, platform profile included), and what it does. Override any key on the command",
        "line (`grove train trainer.lr=1e-5`), select group options (`grove train algorithm=dapo`), or set",
        "fields in Python ([python-api.md](python-api.md)). `grove train --cfg job` prints the composed config.",
        "",
        "\"set in\" names the file whose value the default run uses: `schema` is the dataclass default,",
        "`config.yaml` the main file, `<group>/<option>.yaml` a group option of the default composition.",
        "Keys set by `cluster/cpu_local.yaml` come from the platform profile; the other profile's value is",
        "given beside it. A value that is an interpolation (`${...}`) is shown as written.",
        "",
        "## Config groups",
        "",
        "Select one option per group: `grove train <group>=<option>`. The default of each group is in bold.",
        "\"changes\" lists what the option sets differently from the default composition.",
        "",
    ]
    for group, rows in options:
        out += [f"### `{group}=`", "", "| option | what | changes |", "|---|---|---|"]
        for option, text, changes, is_default in rows:
            name = f"**`{option}`** (default)" if is_default else f"`{option}`"
            out.append(f"| {name} | {_cell(text)} | {_cell(changes) if changes else ''} |")
        out.append("")
    out += ["## Keys", ""]
    for name, cls, keys in sections:
        title = f"`{name}`" if name else "top-level keys"
        out += [f"### {title}", ""]
        if name:
            intro = _doc_first_paragraph(cls)
            out += [f"`{cls.__module__}.{cls.__qualname__}`" + (f": {intro}" if intro else ""), ""]
        out += ["| key | type | default | set in | description |", "|---|---|---|---|---|"]
        for key in keys:
            out.append(f"| `{key.path}` | `{_cell(key.type)}` | `{_cell(key.default)}` | {_cell(key.source)} | "
                       f"{_cell(key.description)} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n", problems


# --------------------------------------------------------------------------------------
# troubleshooting
# --------------------------------------------------------------------------------------

AREAS = {
    "trainer": "Configuration, start-up and the run (trainer/)",
    "algorithms": "Algorithms (algorithms/)",
    "buffer": "Data, samplers and the buffer (buffer/)",
    "rewards": "Rewards (rewards/)",
    "rollout": "Rollout and engines (rollout/)",
}


@dataclass
class Site:
    file: str  # relative to the repo root
    line: int
    function: str  # Class.method, function, or <module>
    exception: str
    message: str  # the message template: literal text with {expr} placeholders
    area: str = ""
    id: str = ""

    @property
    def module(self) -> str:
        return self.file[:-3].replace("/", ".")


def _template(node: ast.AST, source: str) -> str | None:
    """The message template of a message expression, or None if it is not a string."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        parts = []
        for value in node.values:
            if isinstance(value, ast.Constant):
                parts.append(str(value.value))
            else:
                parts.append("{" + (ast.get_source_segment(source, value.value) or "...") + "}")
        return "".join(parts)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _template(node.left, source), _template(node.right, source)
        if left is not None or right is not None:
            return (left if left is not None else "{...}") + (right if right is not None else "{...}")
        return None
    if isinstance(node, ast.IfExp):
        body, orelse = _template(node.body, source), _template(node.orelse, source)
        if body is not None and orelse is not None:
            return body if len(body) >= len(orelse) else orelse
    return None


def _message(call: ast.Call, source: str, skip: int = 0) -> str | None:
    """The message of an exception call: its string arguments' templates, joined with ": "
    (`RewardFailure("nan", f"...")` is kind and detail), or None when it has none."""
    texts = [t for t in (_template(arg, source) for arg in call.args[skip:]) if t is not None]
    if not texts:  # a message built by a call (`RewardAlarmError(self._alarm_message(...))`)
        texts = ["{" + (ast.get_source_segment(source, arg) or "...") + "}"
                 for arg in call.args[skip:] if isinstance(arg, ast.Call)]
    return ": ".join(texts) if texts else None


_NOT_NAMES = {"self", "cfg", "len", "sorted", "list", "str", "type", "min", "max", "repr", "join", "os", "strerror",
              "tuple", "shape", "__name__", "get", "describe_error", "_describe", "_short", "int", "float"}


def _placeholder(expr: str) -> str:
    """`{self.cfg.start_timeout_s}` -> `<start_timeout_s>`: the last name that says what it is."""
    names = [n for n in re.findall(r"[A-Za-z_]\w*", expr) if n not in _NOT_NAMES]
    return f"<{names[-1] if names else 'value'}>"


def _first_words(message: str, count: int) -> str:
    text = re.sub(r"\{([^{}]*)\}", lambda m: _placeholder(m.group(1)), message).replace("`", "'")
    return " ".join(text.split()[:count])


class _SiteFinder(ast.NodeVisitor):
    def __init__(self, file: str, source: str) -> None:
        self.file, self.source = file, source
        self.stack: list[str] = []
        self.nodes: list[ast.AST] = []
        self.sites: list[Site] = []

    def _scoped(self, node) -> None:
        self.stack.append(node.name)
        self.nodes.append(node)
        self.generic_visit(node)
        self.nodes.pop()
        self.stack.pop()

    def _joined_lines(self, call: ast.Call) -> str | None:
        """`raise X("\\n".join(lines))`: the templates of the strings `lines` starts with."""
        arg = call.args[0] if call.args else None
        if not (isinstance(arg, ast.Call) and isinstance(arg.func, ast.Attribute) and arg.func.attr == "join"
                and len(arg.args) == 1 and isinstance(arg.args[0], ast.Name) and self.nodes):
            return None
        for node in ast.walk(self.nodes[-1]):
            if (isinstance(node, ast.Assign) and isinstance(node.value, ast.List)
                    and any(isinstance(t, ast.Name) and t.id == arg.args[0].id for t in node.targets)):
                parts = [_template(e, self.source) for e in node.value.elts]
                parts = [p for p in parts if p is not None]
                if parts:
                    return "\n".join(parts) + "\n..."
        return None

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _scoped

    def _add(self, line: int, exception: str, message: str) -> None:
        self.sites.append(Site(self.file, line, ".".join(self.stack) or "<module>", exception, message))

    def visit_Raise(self, node: ast.Raise) -> None:
        if isinstance(node.exc, ast.Call):
            message = self._joined_lines(node.exc) or _message(node.exc, self.source)
            if message is not None:
                self._add(node.lineno, ast.unparse(node.exc.func).split(".")[-1], message)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        name = ast.unparse(node.func).split(".")[-1]
        if name == "usage_error" and len(node.args) == 2:
            message = _message(node, self.source, skip=1)
            if message is not None:
                self._add(node.lineno, "usage_error", message)
        self.generic_visit(node)


def find_sites() -> list[Site]:
    sites: list[Site] = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            source = path.read_text()
            finder = _SiteFinder(rel, source)
            finder.visit(ast.parse(source))
            for site in finder.sites:
                site.area = package
            sites += finder.sites
    # ids: module:function:exception:first words, with more words until unique
    by_base: dict[str, list[Site]] = {}
    for site in sites:
        by_base.setdefault(f"{site.module}:{site.function}:{site.exception}", []).append(site)
    for base, group in by_base.items():
        count = 6
        while True:
            ids = [f"{base}:{_first_words(s.message, count)}" for s in group]
            longest = max(len(_first_words(s.message, 10**6).split()) for s in group)
            if len(set(ids)) == len(ids) or count > longest:
                break
            count += 1
        seen: dict[str, int] = {}
        for site, site_id in zip(group, ids):
            seen[site_id] = seen.get(site_id, 0) + 1
            site.id = site_id if seen[site_id] == 1 else f"{site_id} #{seen[site_id]}"
    return sites


ENTRY_RE = re.compile(r"^<!-- id: (.+?) -->$", re.M)


@dataclass
class Entry:
    cause: str = TODO
    fix: str = TODO
    extra: list[str] = field(default_factory=list)


def parse_entries(text: str) -> dict[str, Entry]:
    """id -> the hand-written cause and fix of each entry of an existing page."""
    entries: dict[str, Entry] = {}
    marks = list(ENTRY_RE.finditer(text))
    for i, mark in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        body = text[mark.end():end]
        body = re.split(r"^#{1,3} ", body, flags=re.M)[0]
        cause = re.search(r"^\*\*Cause\.\*\* (.*?)(?=^\*\*Fix\.\*\*|\Z)", body, re.S | re.M)
        fix = re.search(r"^\*\*Fix\.\*\* (.*?)\Z", body, re.S | re.M)
        entries[mark.group(1)] = Entry(" ".join(cause.group(1).split()) if cause else TODO,
                                       " ".join(fix.group(1).split()) if fix else TODO)
    return entries


TROUBLE_INTRO = """# Troubleshooting

<!-- Generated by scripts/gen_docs.py from the error sites in buffer/, algorithms/, rewards/,
     rollout/ and trainer/. The **Cause** and **Fix** paragraphs are hand-written and kept by
     `python scripts/gen_docs.py --write`; everything else is regenerated. A new error site gets
     an entry marked TODO, and `--check` (run by tests/unit/test_docs.py) fails until it is written. -->

Every error Grove raises on purpose, with its cause and fix, grouped by where it is raised. Search
this page for the words of the message you got: each entry shows the message as the source writes
it, `{...}` standing for the values filled in.

How errors reach you:

- **Exit code 2, before any engine starts.** `grove: config error: ...` is a bad key, a value out
  of range or an impossible combination (the `__post_init__` checks of the config dataclasses,
  [configuration.md](configuration.md)); `grove: error: ...` is bad input found by the start-up
  check (`trainer/launcher.py:preflight`: the dataset rows, the plug-ins named by path, the model
  folder, every reward called once on the first row). Nothing has been spent yet: fix the input
  and run again.
- **Exit code 1, during the run.** `grove: run failed: ...` is a fault in an engine call, a dead
  worker, a reward alarm or non-finite steps: the message names the engine and the call, shows
  the remote traceback and the ledger. The error at the bottom of the traceback is the one to
  look up here.
- **Reward failures are not errors** until they pass `reward.max_failure_rate`: a reward that
  raises is scored by the failure policy and counted (`reward/failure_rate`), and its message is
  in the alarm's details ([rewards.md](rewards.md)).
- From Python ([python-api.md](python-api.md)), the same errors are raised as exceptions:
  `trainer.api.ConfigError`, `trainer.launcher.StartupError`, `trainer.orchestrator.RunError`.

Every entry's "raised by" names the function; messages from an internal consistency check (a
"bug" in Grove, not in your input) say so in their cause: report them with the run's stderr.
"""


def render_troubleshooting(existing: str) -> tuple[str, list[str]]:
    sites = find_sites()
    entries = parse_entries(existing)
    problems = []
    ids = {s.id for s in sites}
    for gone in sorted(set(entries) - ids):
        problems.append(f"troubleshooting entry {gone!r}: its error site is gone from the source")
    out = [TROUBLE_INTRO.rstrip(), ""]
    out += ["## Contents", ""]
    for package in ("trainer", "algorithms", "buffer", "rewards", "rollout"):
        anchor = re.sub(r"[^\w\- ]", "", AREAS[package].lower()).replace(" ", "-")
        out.append(f"- [{AREAS[package]}](#{anchor})")
    out.append("")
    for package in ("trainer", "algorithms", "buffer", "rewards", "rollout"):
        out += [f"## {AREAS[package]}", ""]
        current_file = None
        for site in sorted((s for s in sites if s.area == package), key=lambda s: (s.file, s.line)):
            if site.file != current_file:
                current_file = site.file
                out += [f"### `{site.file}`", ""]
            entry = entries.get(site.id, Entry())
            if entry.cause == TODO or entry.fix == TODO:
                problems.append(f"{site.file}:{site.line}: error site {site.id!r} has no cause/fix written "
                                "(write them under its entry in docs/troubleshooting.md)")
            raiser = ("`usage_error` (exit code 2)" if site.exception == "usage_error" else f"`{site.exception}`")
            message = site.message.strip().replace("`", "'")
            out += [
                f"<!-- id: {site.id} -->",
                f"#### {_heading(message)}",
                "",
                f"Raised by `{site.function}` ({raiser}):",
                "",
                "```text",
                *_wrapped(message),
                "```",
                "",
                f"**Cause.** {entry.cause}",
                "",
                f"**Fix.** {entry.fix}",
                "",
            ]
    return "\n".join(out).rstrip() + "\n", problems


def _heading(message: str) -> str:
    text = " ".join(message.split())
    text = re.sub(r"\{[^{}]*\}", "…", text)
    text = text if len(text) <= 90 else text[:87].rsplit(" ", 1)[0] + " …"
    return text.replace("<", "&lt;").replace(">", "&gt;").replace("*", "\\*")


def _wrapped(message: str) -> list[str]:
    """The message at most 100 characters a line, its own line breaks kept."""
    lines: list[str] = []
    for line in message.strip().split("\n"):
        indent = line[: len(line) - len(line.lstrip())]
        lines += textwrap.wrap(line, 100, subsequent_indent=indent, break_long_words=False,
                               break_on_hyphens=False) or [""]
    return lines


# --------------------------------------------------------------------------------------


def generate() -> tuple[dict[Path, str], list[str]]:
    config_text, problems = render_configuration()
    existing = TROUBLE_DOC.read_text() if TROUBLE_DOC.exists() else ""
    trouble_text, trouble_problems = render_troubleshooting(existing)
    return {CONFIG_DOC: config_text, TROUBLE_DOC: trouble_text}, problems + trouble_problems


def check() -> tuple[bool, str]:
    """(up to date, report) without writing anything."""
    pages, problems = generate()
    report = []
    for path, text in pages.items():
        current = path.read_text() if path.exists() else ""
        if current != text:
            rel = path.relative_to(ROOT).as_posix()
            diff = difflib.unified_diff(current.splitlines(), text.splitlines(), f"{rel} (on disk)",
                                        f"{rel} (from the source)", lineterm="", n=1)
            report += [f"{rel} is out of date: run `python scripts/gen_docs.py --write`", *list(diff)[:200], ""]
    report += problems
    return not report, "\n".join(report)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="rewrite both pages")
    mode.add_argument("--check", action="store_true", help="exit 1 when a page is out of date or incomplete")
    mode.add_argument("--sites", action="store_true", help="list the error sites found")
    mode.add_argument("--undocumented", action="store_true",
                      help="keys and options described only by this script's KEY_NOTES / OPTION_NOTES")
    args = parser.parse_args(argv)
    if args.sites:
        for site in find_sites():
            print(f"{site.file}:{site.line}\t{site.id}\t{site.message}")
        return 0
    if args.undocumented:
        for key in KEY_NOTES:
            print(f"key {key}: {KEY_NOTES[key]}")
        for name in OPTION_NOTES:
            print(f"option configs/{name}.yaml: {OPTION_NOTES[name]}")
        return 0
    if args.write:
        pages, problems = generate()
        for path, text in pages.items():
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT).as_posix()}")
        for problem in problems:
            print(problem, file=sys.stderr)
        return 1 if problems else 0
    ok, report = check()
    if not ok:
        print(report, file=sys.stderr)
        return 1
    print("docs/configuration.md and docs/troubleshooting.md are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
