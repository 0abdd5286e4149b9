"""params.yaml: load, overlay and validate against a schema before any work starts.

An unknown or mistyped key is an error that names it, e.g. `params.yaml: train_grpo_lora.lora.rank: unknown key`.
`train_grpo_lora.lora` and `.grpo` hold PEFT's `LoraConfig` and TRL's `GRPOConfig` own field names: this module
builds those configs (`lora_config`, `grpo_config`) and checks them (field names, value types, the dataclasses' own
checks) with `load_params(..., libraries=True)`: in `python -m repic.core.params check|apply`, when the Snakefile
builds the DAG, and when fetch_data (the DAG's first stage) and train_grpo_lora start.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import yaml

from repic.core.io import RepicError
from repic.core.layout import MERGE_DIR, MODEL_KINDS, PROTOCOLS, REWARDS, SETTINGS, TRAIN_DIR

# Values of keys checked again by the modules that use them (tests/test_eval_fidelity.py checks they agree); kept
# here so that params.py imports none of them (every stage's dvc.yaml deps would grow).
CONVERSATIONS = ("repic", "ours")                 # repic.core.prompts.CONVERSATIONS
QUESTION_LISTS = ("released", "scripts")          # repic.core.prompts.QUESTION_LISTS
ROW_PROMPTS = ("plain", "zero_shot")              # repic.core.prompts.ROW_PROMPTS
ON_EMPTY = ("whole_image", "no_references")       # repic.data.retrieval.ON_EMPTY
PREPROCESS = ("qwen_vl_utils", "processor")       # repic.vlm.preprocess.PREPROCESS
JUDGE_PROTOCOLS = ("both_orders", "repic")        # repic.eval.judge.PROTOCOLS


def _obj(props: dict[str, Any], required: bool = True, open_: bool = False,
         optional: dict[str, Any] | None = None) -> dict[str, Any]:
    """An object schema: `props` required (unless `required` is false), `optional` allowed, nothing else."""
    schema: dict[str, Any] = {"type": "object", "properties": {**props, **(optional or {})}}
    if required:
        schema["required"] = sorted(props)
    if not open_:
        schema["additionalProperties"] = False
    return schema


_STR = {"type": "string"}
_INT = {"type": "integer", "minimum": 0}
_POS = {"type": "integer", "minimum": 1}
_NUM = {"type": "number"}
_RATE = {"type": "number", "minimum": 0, "maximum": 1}

# ---- fetch_data.sources: the kinds of source (repic.data.sources fetches them) and the schema of one spec
SOURCE_KINDS = ("hf", "url", "local", "git")
# JSON schema of one source spec in params (fetch_data.sources.<name>). if/then per kind rather than oneOf, so a
# validation error names the offending key instead of "not valid under any of the given schemas".
_HEX64 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
_HEX40 = {"type": "string", "pattern": "^[0-9a-f]{40}$"}
# A relative path that stays inside its tree: not absolute, no '..' component, not empty.
_INSIDE = {"type": "string", "pattern": r"^(?!/)(?![A-Za-z]:)(?!.*(^|[/\\])\.\.([/\\]|$)).+$"}
_NET = {"retries": {"type": "integer", "minimum": 0}, "timeout_s": {"type": "number", "exclusiveMinimum": 0},
        "backoff_s": {"type": "number", "minimum": 0}}
_RECORD = {"const": True}
_KIND_PROPS: dict[str, dict[str, Any]] = {
    "hf": {"repo_id": _STR, "repo_type": {"enum": ["model", "dataset"]}, "revision": _HEX40, "record": _RECORD,
           "allow_patterns": {"type": "array", "items": _STR}, "endpoint": _STR, "expect": _STR},
    "url": {"url": {"type": "string", "pattern": "^https?://"}, "sha256": _HEX64, "record": _RECORD,
            "filename": _STR, "extract": {"type": "boolean"}, "subdir": _INSIDE, "expect": _STR, **_NET},
    "local": {"path": _STR, "sha256": _HEX64, "mode": {"enum": ["copy", "symlink"]},
              "require": {"type": "array", "items": _STR}},
    "git": {"repo": {"type": "string", "pattern": "^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$"}, "commit": _HEX40,
            "manifest": _STR, "subdir": _INSIDE, "lfs": {"type": "boolean"}, **_NET},
}
_KIND_REQUIRED = {"hf": ["repo_id"], "url": ["url"], "local": ["path", "sha256"],
                  "git": ["repo", "commit", "manifest"]}
# The pin of an hf/url source: exactly one of its checksum and `record: true` (record on first download).
SOURCE_PIN = {"hf": "revision", "url": "sha256"}
SOURCE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["kind", "dest"],
    "properties": {"kind": {"enum": list(SOURCE_KINDS)}, "dest": _STR},
    "allOf": [
        {"if": {"properties": {"kind": {"const": kind}}, "required": ["kind"]},
         "then": {"required": _KIND_REQUIRED[kind], "additionalProperties": False,
                  "properties": {"kind": {"const": kind}, "dest": _STR, **props},
                  **({"oneOf": [{"required": [SOURCE_PIN[kind]]}, {"required": ["record"]}]}
                     if kind in SOURCE_PIN else {})}}
        for kind, props in _KIND_PROPS.items()
    ],
}

# An evaluation dataset: its own database (and retrieval index) and the query maps of the settings it has.
_DATASET = {**_obj({"name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]*$"}, "database": _STR,
                    "queries": {**_obj({s: _STR for s in SETTINGS}, required=False),
                                "minProperties": 1}})}

# A model row (params `models`: name -> row, in table order): its label and its weights, a model folder or a LoRA
# adapter on base.base_model. The name is a DVC foreach key and a file-name part (`<name>_<mode>.json`).
_MODEL_NAME = "^[A-Za-z][A-Za-z0-9_-]*$"
# `external: true`: the weights are a local folder outside the project (a user's own checkpoint), an absolute path
# that DVC tracks by content as an external dependency of the row's caption stages.
_MODEL_ROW = _obj({"label": {"type": "string", "minLength": 1}, "kind": {"enum": list(MODEL_KINDS)},
                   "path": {"type": "string", "minLength": 1}}, optional={"external": {"type": "boolean"}})

SCHEMA: dict[str, Any] = _obj({
    "base": _obj({
        "seed": _INT,
        "threads": {"type": ["integer", "null"], "minimum": 1},
        "device": {"type": "string", "pattern": "^(auto|cpu|cuda(:[0-9]+)?)$"},
        "dtype": {"enum": ["auto", "float32", "bfloat16", "float16"]},
        "data": _obj({"root": _STR, "train_json": _STR,
                      "datasets": {"type": "array", "items": _DATASET, "minItems": 1}}),
        "base_model": _STR,
    }),
    "fetch_data": _obj({
        "source": {"enum": ["synthetic", "real"]},
        "strict": {"type": "boolean"},
        "cache": {"type": ["string", "null"]},
        "lock": {"type": ["string", "null"]},
        "sources": {"type": "object", "additionalProperties": SOURCE_SCHEMA},
        "world": _obj({
            "n_concepts": {"type": "integer", "minimum": 4}, "n_distractors": _INT, "queries_single": _POS,
            "queries_multi2": _POS, "queries_multi4": _POS, "train_per_method": _POS,
            "image_size": {"type": "integer", "minimum": 56},
        }),
        "tiny_model": _obj({
            "vocab_size": {"type": "integer", "minimum": 300}, "hidden_size": _POS, "intermediate_size": _POS,
            "num_hidden_layers": _POS, "num_attention_heads": _POS, "num_key_value_heads": _POS,
            "vision_hidden_size": _POS, "vision_depth": _POS, "vision_heads": _POS,
            "min_pixels": _POS, "max_pixels": _POS,
        }, optional={"embedding_std": {"type": "number", "exclusiveMinimum": 0},
                     "rope_theta": {"type": "number", "exclusiveMinimum": 0},
                     "tie_word_embeddings": {"type": "boolean"},
                     "name_share": {"type": "number", "minimum": 0}}),
        "warmup": _obj({
            "examples": _POS, "names": _POS, "name_rate": _RATE, "name_rate_asked": _RATE,
            "drills": _POS, "judge": _POS, "drill_batch_size": _POS, "drill_steps": _INT, "warmup_steps": _INT,
            "steps": _INT, "batch_size": _POS, "learning_rate": _NUM,
        }),
    }),
    "subset_2k": _obj({"n_samples": _POS}),
    "build_db": _obj({"embedder": {"enum": ["color_layout", "clip"]}, "embedder_kwargs": {"type": "object"},
                      "index_unlisted": {"type": "boolean"}}),
    "caption": _obj({
        "backend": {"enum": ["hf", "static"]},
        "batch_size": _POS, "max_new_tokens": _POS,
        "detector": {"enum": ["foreground", "owlv2", "yolo_world"]}, "detector_kwargs": {"type": "object"},
        "max_pixels": {"type": ["integer", "null"], "minimum": 3136},
        "top_k": _obj({s: _POS for s in SETTINGS}),
        # RePIC's caption scripts (repic.core.prompts, repic.vlm.preprocess) or ours; README "Fidelity to RePIC"
        "conversation": {"enum": list(CONVERSATIONS)},
        "question_list": {"enum": list(QUESTION_LISTS)},
        "preprocess": {"enum": list(PREPROCESS)},
        "prompts": {"type": "object", "additionalProperties": {"enum": list(ROW_PROMPTS)}},
        "retrieval": _obj({"box_pad": {"type": "number", "minimum": 0, "maximum": 1},
                           "whole_image": {"type": "boolean"}, "on_empty": {"enum": list(ON_EMPTY)}}),
    }),
    "train_grpo_lora": _obj({
        "launch": _STR,
        "rollout_backend": {"enum": ["hf", "static"]},
        "protocol": {"enum": list(PROTOCOLS)},
        "rewards": {"type": "array", "items": {"enum": list(REWARDS)}, "minItems": 1},
        "heldout_eval": _INT,
        "resize": _obj({"multi_short_side": _POS, "single_short_side": _POS}),
        # repic.train.grpo: groups (repic: G samples, as RePIC's 8 processes; grpo: G completions of one prompt),
        # completions per optimizer step (sets per-device batch and accumulation for the run's processes), LoRA
        # targets (repic: every non-vision nn.Linear, lm_head included; language_model: LANGUAGE_MODEL_LINEAR),
        # LoRA dropout during rollouts
        "grouping": {"enum": ["repic", "grpo"]},
        "completions_per_step": _POS,
        "lora_targets": {"enum": ["repic", "language_model"]},
        "rollout_dropout": {"type": "boolean"},
        "lora": {"type": "object"},
        "grpo": {"type": "object"},
    }, optional={"min_pixels": {"type": "integer", "minimum": 3136},  # the processor's bounds (RePIC's
                 "max_pixels": {"type": "integer", "minimum": 3136}}),  # trainer sets both); absent: the base's
    "models": {"type": "object", "minProperties": 1, "propertyNames": {"pattern": _MODEL_NAME},
               "additionalProperties": _MODEL_ROW},
    "score": _obj({"protocol": {"enum": list(PROTOCOLS)}}),
    "merge_lora": _obj({"n_inputs": _POS, "max_new_tokens": _POS,
                        "tolerance": _obj({"float32": {"type": "number", "minimum": 0},
                                           "bfloat16": {"type": "number", "minimum": 0}})}),
    "report": _obj({"max_queries": _POS}),
    "judge_llm": _obj({
        "backend": {"enum": ["local", "openai", "none"]},
        "protocol": {"enum": list(JUDGE_PROTOCOLS)},
        "model": _STR, "reference": _STR, "max_pairs": _POS, "max_requests": _INT, "max_new_tokens": _POS,
        "openai": _obj({"base_url": _STR, "model": _STR, "api_key_env": _STR, "max_retries": _INT,
                        "backoff_s": {"type": "number", "minimum": 0}, "timeout_s": {"type": "number", "minimum": 0}}),
    }),
})


# Sections an overlay replaces whole instead of merging key by key: `models` is a list of rows (kept as a mapping
# for DVC's `foreach` stage names), so an overlay states every row, in its order.
REPLACED_SECTIONS = ("models",)


def deep_merge(base: dict[str, Any], overlay: dict[str, Any], _top: bool = True) -> dict[str, Any]:
    """Overlay `overlay` onto `base` (dicts merge key by key, except the top-level `REPLACED_SECTIONS`;
    everything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if _top and key in REPLACED_SECTIONS:
            out[key] = copy.deepcopy(value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value, _top=False)
        else:
            out[key] = copy.deepcopy(value)
    return out


# DVC 3.67 leaves every dict key so named, at any depth, out of a stage's run-cache key
# (dvc.stage.cache._get_cache_hash excludes Meta.PARAM_SIZE and Meta.PARAM_NFILES): a change to such a param
# would make `dvc repro` restore the previous result. tests/test_dvc_params.py checks every declared param.
RUN_CACHE_BLIND_KEYS = ("size", "nfiles")


def _blind_key(value: Any, path: tuple = ()) -> str | None:
    if isinstance(value, dict):
        for key, sub in value.items():
            if key in RUN_CACHE_BLIND_KEYS:
                return ".".join(map(str, (*path, key)))
            if found := _blind_key(sub, (*path, key)):
                return found
    elif isinstance(value, list):
        for i, sub in enumerate(value):
            if found := _blind_key(sub, (*path, i)):
                return found
    return None


def _yaml_number_hint(value: Any) -> str:
    """YAML 1.1 (PyYAML) reads `1e-4` as a string: a float needs a dot."""
    if isinstance(value, str) and re.fullmatch(r"[-+]?[0-9]+[eE][-+]?[0-9]+", value):
        return f" (YAML reads {value} as a string, a number needs a dot: write {re.sub('[eE]', '.0e', value)})"
    return ""


def validate(params: dict[str, Any], source: str = "params.yaml") -> None:
    """Raise RepicError naming the first offending key (dotted path) and what was expected."""
    import jsonschema

    if blind := _blind_key(params):
        raise RepicError(f"{source}: {blind}: a key named {blind.split('.')[-1]!r} is ignored by DVC's run cache "
                         "(a change would restore a stale result); no param may be named "
                         f"{' or '.join(RUN_CACHE_BLIND_KEYS)}")

    validator = jsonschema.Draft202012Validator(SCHEMA)
    errors = sorted(validator.iter_errors(params), key=lambda e: list(e.absolute_path))
    if not errors:
        check_models(params, source)
        pixels = {k: params["train_grpo_lora"].get(k) for k in ("min_pixels", "max_pixels")}
        if None not in pixels.values() and pixels["min_pixels"] > pixels["max_pixels"]:
            raise RepicError(f"{source}: train_grpo_lora.min_pixels: {pixels['min_pixels']} is above max_pixels "
                             f"{pixels['max_pixels']}")
        return
    err = errors[0]
    where = ".".join(str(p) for p in err.absolute_path)
    if err.validator == "additionalProperties":
        extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
        key = ".".join([where, extra[0]]) if where else extra[0]
        raise RepicError(f"{source}: {key}: unknown key (expected one of {sorted(err.schema['properties'])})")
    if err.validator == "required":
        raise RepicError(f"{source}: {where or '<top>'}: {err.message}")
    if "propertyNames" in err.schema_path:
        raise RepicError(f"{source}: {where}.{err.instance}: model row names are letters, digits, _ and - "
                         "(a DVC stage name and a file-name part), starting with a letter")
    raise RepicError(f"{source}: {where}: {err.message}{_yaml_number_hint(err.instance)}")


def check_models(params: dict[str, Any], source: str = "params.yaml") -> None:
    """The model rows beyond the schema: the judge's reference is a row, and every row's weights are produced by
    the DAG, so that DVC tracks them: fetch_data's outputs (the base model, the data root: released checkpoints
    are `fetch_data.sources` landing there), or train_grpo_lora's / merge_lora's outputs."""
    models, base = params["models"], params["base"]
    reference = params["judge_llm"]["reference"]
    for row, prompt in params["caption"]["prompts"].items():
        if row not in models:
            raise RepicError(f"{source}: caption.prompts.{row}: not a model row (models: {', '.join(models)})")
        if prompt != "plain" and params["caption"]["conversation"] != "repic":
            raise RepicError(f"{source}: caption.prompts.{row}: {prompt!r} needs caption.conversation: repic "
                             "(RePIC's zero-shot instruction belongs to its conversation)")
    if reference not in models:
        raise RepicError(f"{source}: judge_llm.reference: {reference!r} is not a model row "
                         f"(models: {', '.join(models)})")
    produced = (base["base_model"], base["data"]["root"], TRAIN_DIR, MERGE_DIR)
    for name, row in models.items():
        path = Path(row["path"])
        if row.get("external"):
            if not path.is_absolute() or not path.is_dir():
                raise RepicError(f"{source}: models.{name}.path: {row['path']!r}: an external row's weights are an "
                                 "existing folder, by its absolute path (DVC tracks it by content)")
            continue
        if path.is_absolute() or ".." in path.parts or not any(
                path == Path(p) or Path(p) in path.parents for p in produced):
            raise RepicError(f"{source}: models.{name}.path: {row['path']!r} is not produced by the DAG (expected "
                             f"inside one of {', '.join(produced)}: fetch a released checkpoint with a "
                             "fetch_data.sources entry, or mark a local folder outside the project `external: true`)")
        if params["fetch_data"]["source"] == "real" and Path(base["data"]["root"]) in path.parents:
            # a released checkpoint: some fetch_data source must land it (dest `data/<path in the data root>`)
            dests = [Path(base["data"]["root"]) / s["dest"].partition("/")[2]
                     for s in params["fetch_data"]["sources"].values() if s["dest"].partition("/")[0] == "data"]
            if not any(path == d or d in path.parents for d in dests):
                raise RepicError(f"{source}: models.{name}.path: {row['path']!r}: no fetch_data.sources entry lands "
                                 "there (declare the checkpoint as a source with dest data/...)")


def params_of(args: Any, *, libraries: bool = False) -> dict[str, Any]:
    """A stage's validated params: the file of its `--params` argument (repic.core.cli.parser); `libraries`:
    GRPOConfig/LoraConfig sections too (seconds)."""
    return load_params(args.params, libraries=libraries)


def load_params(path: str | os.PathLike = "params.yaml", *, libraries: bool = False) -> dict[str, Any]:
    """params.yaml validated against the schema; with `libraries`, also its GRPOConfig/LoraConfig sections
    (`check_libraries`: imports TRL and PEFT, seconds)."""
    path = Path(path)
    if not path.is_file():
        raise RepicError(f"{path}: file not found")
    try:
        params = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise RepicError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(params, dict):
        raise RepicError(f"{path}: expected a mapping of sections")
    validate(params, str(path))
    if libraries:
        check_libraries(params, str(path))
    return params


def _matches(value: Any, hint: Any) -> bool:
    """Whether a YAML value fits a dataclass field's type hint. Strict on the scalars YAML gets wrong (`1e-4` is
    a string to YAML, `yes` a bool), lenient on types params.yaml cannot express (callables, config objects)."""
    import enum
    import types
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is None or hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:
        # PEFT writes a family of values as one template, e.g. 'pissa_niter_[number of iters]'
        return value in args or (isinstance(value, str) and any(isinstance(a, str) and "[" in a for a in args))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return value in {m.value for m in hint}
    if origin in (list, tuple) or hint in (list, tuple):
        return isinstance(value, list) and (not args or all(_matches(v, args[0]) for v in value))
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return True


def _expected(hint: Any) -> str:
    import types
    import typing

    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_expected(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is typing.Literal:
        return f"one of {list(typing.get_args(hint))}"
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def check_fields(section: str, values: dict[str, Any], dataclass_type: type, source: str = "params.yaml") -> None:
    """Keys of a library-config section must be fields of that library's dataclass (GRPOConfig, LoraConfig), and
    values of the field's type: a dataclass does not check types, so `learning_rate: 1e-4` (a string to YAML)
    would only fail inside torch, hours into a run."""
    import dataclasses
    import typing

    names = {f.name for f in dataclasses.fields(dataclass_type)}
    hints = typing.get_type_hints(dataclass_type)
    for key, value in values.items():
        if key not in names:
            raise RepicError(f"{source}: {section}.{key}: unknown key (not a field of {dataclass_type.__name__})")
        if not _matches(value, hints.get(key, Any)):
            raise RepicError(f"{source}: {section}.{key}: {value!r} is not {_expected(hints[key])} "
                             f"({dataclass_type.__name__}.{key}){_yaml_number_hint(value)}")


# LoRA's default target: the language model's linear layers only. `gate_proj/up_proj/down_proj` also name the
# vision tower's MLPs, so a bare list of names would put LoRA on the frozen vision encoder too.
LANGUAGE_MODEL_LINEAR = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def lora_config(lora: dict[str, Any], source: str = "params.yaml") -> Any:
    """PEFT `LoraConfig` of params `train_grpo_lora.lora` (checked field by field first)."""
    from peft import LoraConfig

    check_fields("train_grpo_lora.lora", lora, LoraConfig, source)
    kwargs = dict(lora)
    kwargs.setdefault("target_modules", LANGUAGE_MODEL_LINEAR)
    kwargs.setdefault("task_type", "CAUSAL_LM")
    try:
        return LoraConfig(**kwargs)
    except (ValueError, TypeError) as exc:  # LoraConfig.__post_init__'s own checks
        raise RepicError(f"{source}: train_grpo_lora.lora: {str(exc).splitlines()[0]}") from None


def grpo_config(grpo: dict[str, Any], output_dir: str | os.PathLike, use_cpu: bool, source: str = "params.yaml"
                ) -> Any:
    """TRL `GRPOConfig` of params `train_grpo_lora.grpo` (checked field by field first)."""
    from trl import GRPOConfig

    check_fields("train_grpo_lora.grpo", grpo, GRPOConfig, source)
    kwargs = dict(grpo)
    kwargs.setdefault("report_to", "none")
    kwargs.setdefault("save_strategy", "no")
    try:
        return GRPOConfig(output_dir=str(output_dir), use_cpu=use_cpu, **kwargs)
    except (ValueError, TypeError) as exc:  # GRPOConfig/TrainingArguments.__post_init__'s own checks
        raise RepicError(f"{source}: train_grpo_lora.grpo: {str(exc).splitlines()[0]}") from None


def batch_plan(grpo: dict[str, Any], completions_per_step: int, world_size: int, source: str = "params.yaml"
               ) -> dict[str, Any]:
    """`grpo` (GRPOConfig fields) with `per_device_train_batch_size` and `gradient_accumulation_steps` set so that
    one optimizer step sees `completions_per_step` completions over `world_size` processes. TRL counts completions
    per device (as RePIC's trainer did); `per_device_train_batch_size` is the most a GPU takes per micro-step: it is
    lowered to the largest divisor of the completions per process that fits, the rest is accumulation.
    RePIC: 16 completions = 8 GPUs x 1 x accumulation 2; here 1 GPU gives 8 x 2 (at most 8 a micro-step),
    8 GPUs 2 x 1, 16 GPUs (2 nodes) 1 x 1."""
    where = f"{source}: train_grpo_lora"
    if "gradient_accumulation_steps" in grpo:
        raise RepicError(f"{where}.grpo.gradient_accumulation_steps: set from train_grpo_lora.completions_per_step "
                         "(completions per optimizer step); remove it")
    generations = grpo.get("num_generations", 8)  # GRPOConfig's defaults
    most = grpo.get("per_device_train_batch_size", 8)
    if completions_per_step % generations:
        raise RepicError(f"{where}.completions_per_step: {completions_per_step} is not a multiple of "
                         f"grpo.num_generations ({generations}): a group of {generations} is normalised together")
    if completions_per_step % world_size:
        raise RepicError(f"{where}.completions_per_step: {completions_per_step} completions cannot be split evenly "
                         f"over {world_size} processes")
    per_process = completions_per_step // world_size
    per_device = max(d for d in range(1, min(most, per_process) + 1) if per_process % d == 0)
    return {**grpo, "per_device_train_batch_size": per_device, "gradient_accumulation_steps": per_process // per_device}


def check_libraries(params: dict[str, Any], source: str = "params.yaml") -> None:
    """Beyond the schema: the training section's LoraConfig and GRPOConfig (field names, value types, and the
    dataclasses' own checks), built as training builds them. Imports TRL and PEFT (seconds); writes nothing.
    (GRPOConfig's batch divisibility checks see one process.)"""
    import tempfile

    section = params["train_grpo_lora"]
    lora_config(section["lora"], source)
    if section["lora_targets"] == "repic" and "target_modules" in section["lora"]:
        raise RepicError(f"{source}: train_grpo_lora.lora.target_modules: lora_targets: repic sets them; remove "
                         "one of the two")
    grpo = batch_plan(section["grpo"], section["completions_per_step"], 1, source)  # the run's processes: at start
    with tempfile.TemporaryDirectory() as tmp:  # GRPOConfig wants an output_dir; nothing is written there
        grpo_config({**grpo, "seed": params["base"]["seed"]}, tmp, use_cpu=True, source=source)


def trained_rows(params: dict[str, Any]) -> list[str]:
    """The model rows whose weights our training makes (train_grpo_lora's or merge_lora's outputs)."""
    def made_in(path: Path, folder: Path) -> bool:
        return path == folder or folder in path.parents

    return [name for name, row in params["models"].items()
            if any(made_in(Path(row["path"]), Path(d)) for d in (TRAIN_DIR, MERGE_DIR))]


def without_training(params: dict[str, Any], source: str = "params.yaml") -> dict[str, Any]:
    """`params` with the rows our training makes left out: the released checkpoints' rows alone, whose captions,
    scores, judge and tables need no train_grpo_lora (their DVC stages are the same ones, so putting the rows back
    later recomputes only those rows)."""
    dropped = trained_rows(params)
    if params["judge_llm"]["reference"] in dropped:
        raise RepicError(f"{source}: judge_llm.reference: {params['judge_llm']['reference']!r} is made by training; "
                         "name a released row as the reference to evaluate without training")
    out = copy.deepcopy(params)
    out["models"] = {name: row for name, row in params["models"].items() if name not in dropped}
    out["caption"]["prompts"] = {r: p for r, p in params["caption"]["prompts"].items() if r not in dropped}
    if not out["models"]:
        raise RepicError(f"{source}: models: every row is made by training, none is left to evaluate")
    validate(out, source)
    return out


def read_overlay(path: str | os.PathLike) -> dict[str, Any]:
    """An overlay file's sections (a YAML mapping; empty: none); missing, unreadable or not a mapping: one line
    naming the file."""
    path = Path(path)
    if not path.is_file():
        raise RepicError(f"{path}: overlay file not found (expected a YAML mapping of params sections, e.g. "
                         "configs/paper.yaml)")
    try:
        overlay = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise RepicError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    except UnicodeDecodeError:
        raise RepicError(f"{path}: not UTF-8 text (expected a YAML mapping of params sections)") from None
    if overlay is None:
        return {}
    if not isinstance(overlay, dict):
        raise RepicError(f"{path}: expected a mapping of params sections (base:, fetch_data:, ...), "
                         f"got a {type(overlay).__name__}")
    return overlay


# ---- overlays that keep params.yaml's text: comments, key order, flow/block style and scalars as written.
# A round-trip YAML library (ruamel.yaml, DVC's own) attaches each comment to the node before it: a value's end-of-line
# comment, then what follows its line up to the next key (blank lines, full-line comments documenting that key): its
# "tail". Replacing or appending a value moves the tail of what it displaces, so every comment stays in place.


def _round_trip() -> Any:
    from ruamel.yaml import YAML

    rt = YAML()  # round-trip: params.yaml's own layout (2-space mappings, `- ` items indented 2 inside their key)
    rt.width = 110
    rt.indent(mapping=2, sequence=4, offset=2)
    rt.preserve_quotes = True
    rt.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    return rt


def _block(node: Any) -> bool:
    """A non-empty block-style collection: its last line is its last item's, which then holds the tail."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    return isinstance(node, (CommentedMap, CommentedSeq)) and len(node) > 0 and not node.fa.flow_style()


def _holder(parent: Any, key: Any) -> tuple[dict, Any, int]:
    """Where the comment after `parent[key]` lives, `parent[key]` being a scalar or a flow collection."""
    return parent.ca.items, key, (0 if isinstance(parent, list) else 2)


def _last_holder(node: Any) -> tuple[dict, Any, int]:
    """Where the comment after a block collection's last line lives (its last item's, at any depth)."""
    key = len(node) - 1 if isinstance(node, list) else next(reversed(node))
    return _last_holder(node[key]) if _block(node[key]) else _holder(node, key)


def _take_tail(holder: tuple[dict, Any, int]) -> str:
    """Cut the tail off the comment at `holder` (its end-of-line part stays) and return it."""
    items, key, index = holder
    token = (items.get(key) or [None] * 4)[index]
    if token is None or "\n" not in token.value:
        return ""
    head, _, tail = token.value.partition("\n")
    token.value = head + "\n"
    return tail


def _put_tail(holder: tuple[dict, Any, int], tail: str) -> None:
    from ruamel.yaml.error import CommentMark
    from ruamel.yaml.tokens import CommentToken

    if not tail:
        return
    items, key, index = holder
    entry = items.setdefault(key, [None] * 4)
    if entry[index] is None:
        entry[index] = CommentToken("\n" + tail, CommentMark(0), None)
    else:
        entry[index].value = entry[index].value.rstrip("\n") + "\n" + tail


def _end_holder(parent: Any, key: Any) -> tuple[dict, Any, int]:
    return _last_holder(parent[key]) if _block(parent[key]) else _holder(parent, key)


def _line_comment(parent: Any, key: Any, token: Any) -> None:
    """`token` (or none) as the comment on `parent[key]`'s line. A collection value holds it itself (and, flow
    style, the tail after it too), a scalar's parent does: both point at the same token, as ruamel.yaml loads it."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    entry = parent.ca.items.setdefault(key, [None] * 4)
    entry[0 if isinstance(parent, list) else 2] = token
    if isinstance(parent[key], (CommentedMap, CommentedSeq)):
        parent[key].ca.comment = [token, None] if token is not None else None


def _spread(node: Any, key_line: int | None) -> bool:
    """Whether an overlay's flow mapping is written over several lines or not on its key's line."""
    lines = {node.lc.line} | {ln for pos in node.lc.data.values() for ln in (pos[0], pos[2])}
    return len(lines) > 1 or key_line not in (None, node.lc.line)


def _unwrap(node: Any, key_line: int | None = None) -> None:
    """An overlay's flow mappings not on their key's line (`key:  # comment` then `{...}`) or over several lines
    become block mappings: ruamel.yaml would rewrap them at its width, their comments after the last line."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    if isinstance(node, CommentedMap):
        if node.fa.flow_style() and _spread(node, key_line):
            node.fa.set_block_style()
        for key, value in node.items():
            _unwrap(value, node.lc.data[key][0] if key in node.lc.data else None)
    elif isinstance(node, CommentedSeq):
        for value in node:
            _unwrap(value)


def _set_value(parent: Any, key: Any, value: Any, eol: Any = None, key_line: int | None = None) -> None:
    """`parent[key] = value` (a key already there or a new last key), the comments around it kept: the comment
    on the key's line stays (a new key: the overlay's, `eol`), and the tail that followed the old value (or the
    collection's last line) follows the new one."""
    import copy as copy_

    if key in parent:
        tail = _take_tail(_end_holder(parent, key))
        line = (parent.ca.items.get(key) or [None] * 4)[2]
        if _block(parent[key]):
            line = parent[key].ca.comment[0] if parent[key].ca.comment else line
    else:
        tail = _take_tail(_last_holder(parent)) if _block(parent) else ""
        line = None
        if eol is not None and eol.value.strip():
            line = copy_.copy(eol)
            line.value = eol.value.partition("\n")[0] + "\n"
    _unwrap(value, key_line)
    if _block(value):
        _take_tail(_last_holder(value))  # the overlay's own layout after it (blank lines, its next key's comment)
    parent[key] = value
    _line_comment(parent, key, line)
    _put_tail(_end_holder(parent, key), tail)
    if not _block(value):
        _line_comment(parent, key, (parent.ca.items.get(key) or [None] * 4)[2])


def _delete(parent: Any, key: Any) -> None:
    """Drop `parent[key]`; the tail after it moves to what comes before it (or is lost with the first key)."""
    keys = list(parent)
    tail = _take_tail(_end_holder(parent, key))
    position = keys.index(key)
    del parent[key]
    parent.ca.items.pop(key, None)
    if position > 0:
        _put_tail(_end_holder(parent, keys[position - 1]), tail)


def _overlay_node(base: Any, overlay: Any, top: bool = True) -> None:
    """`deep_merge` on round-trip nodes: `base` edited in place, key order and comments kept."""
    for key, value in overlay.items():
        old = base.get(key)
        eol, key_line = overlay.ca.items.get(key, [None] * 4)[2], overlay.lc.data[key][0]
        if top and key in REPLACED_SECTIONS and isinstance(value, dict) and isinstance(old, dict) and old:
            _replace_rows(base[key], value)
        elif isinstance(value, dict) and isinstance(old, dict) and old:
            _overlay_node(old, value, top=False)
            if old.fa.flow_style() and (not value.fa.flow_style() or _spread(value, key_line)):
                old.fa.set_block_style()  # keys added to a one-line mapping from an overlay's longer one
        else:
            _set_value(base, key, value, eol, key_line)


def _replace_rows(base: Any, overlay: Any) -> None:
    """A replaced section (`models`) row by row, so a row in both keeps its comments; order and rows: overlay's."""
    tail = _take_tail(_last_holder(base)) if _block(base) else ""
    for key in [k for k in base if k not in overlay]:
        _delete(base, key)
    for key, value in overlay.items():
        if key in base and base[key] == value:
            continue
        _set_value(base, key, value, overlay.ca.items.get(key, [None] * 4)[2], overlay.lc.data[key][0])
    for key in overlay:
        base.move_to_end(key)
    if _block(base):
        _put_tail(_last_holder(base), tail)


def _load_round_trip(rt: Any, path: str | os.PathLike) -> Any:
    from ruamel.yaml import YAMLError

    try:
        return rt.load(Path(path).read_text(encoding="utf-8"))
    except YAMLError as exc:  # what PyYAML lets pass and ruamel.yaml does not (a key given twice)
        detail = getattr(exc, "problem", None) or str(exc).strip().splitlines()[0]
        mark = getattr(exc, "problem_mark", None)
        raise RepicError(f"{path}: invalid YAML ({detail}{f', line {mark.line + 1}' if mark else ''})") from None


def apply_overlay(params_path: str | os.PathLike, overlay_path: str | os.PathLike, *,
                  released_only: bool = False) -> dict[str, Any]:
    """Rewrite `params_path` as itself overlaid with `overlay_path` (validated first, written atomically); with
    `released_only`, without the model rows our training makes (`without_training`). Only the values the overlay
    sets change in the file: its comments, key order and layout stay (round-trip YAML), so `git diff` shows them."""
    import io

    from repic.core.io import write_text

    base = load_params(params_path)
    overlay = read_overlay(overlay_path)
    merged = deep_merge(base, overlay)
    where = f"{params_path} + {overlay_path}"
    validate(merged, where)
    if released_only:
        merged = without_training(merged, where)
    check_libraries(merged, where)
    rt = _round_trip()
    text, layout = (_load_round_trip(rt, p) for p in (params_path, overlay_path))
    _overlay_node(text, layout or {})
    for name in [n for n in text["models"] if n not in merged["models"]]:
        _delete(text["models"], name)
    out = io.StringIO()
    rt.dump(text, out)
    if yaml.safe_load(out.getvalue()) != merged:  # the file says what was validated, read as every reader reads it
        raise RepicError(f"{where}: the overlay could not be written keeping {params_path}'s layout (a value reads "
                         "differently once written); write the merged values by hand")
    write_text(params_path, out.getvalue())
    return merged


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m repic.core.params", description="validate or overlay params.yaml")
    sub = p.add_subparsers(dest="command", required=True)
    ck = sub.add_parser("check", help="validate params.yaml: the schema (reward names included) and the "
                        "GRPOConfig/LoraConfig sections (field names, types, the dataclasses' own checks)")
    ck.add_argument("--params", default="params.yaml")
    ap = sub.add_parser("apply", help="overlay a config (e.g. configs/paper.yaml) onto params.yaml")
    ap.add_argument("overlay")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--released-only", action="store_true",
                    help="leave out the model rows our training makes (results/train, results/merged): evaluate the "
                    "released checkpoints without train_grpo_lora")
    args = p.parse_args(argv)
    try:
        if args.command == "check":
            load_params(args.params, libraries=True)
        else:
            apply_overlay(args.params, args.overlay, released_only=args.released_only)
    except RepicError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
