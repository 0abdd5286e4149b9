"""params.yaml: load, overlay and validate against a schema before any work starts.

An unknown or mistyped key is an error that names it, e.g. `params.yaml: train_grpo_lora.lora.rank: unknown key`.
`lora` and `grpo` hold PEFT's and TRL's own field names; they are checked against those dataclasses when the
training stage builds its configs.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

from repic.io import RepicError
from repic.sources import SOURCE_SCHEMA


def _obj(props: dict[str, Any], required: bool = True, open_: bool = False) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        schema["required"] = sorted(props)
    if not open_:
        schema["additionalProperties"] = False
    return schema


_STR = {"type": "string"}
_INT = {"type": "integer", "minimum": 0}
_POS = {"type": "integer", "minimum": 1}
_NUM = {"type": "number"}
# An evaluation dataset: its own database (and retrieval index) and the query maps of the settings it has.
_DATASET = {**_obj({"name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]*$"}, "database": _STR,
                    "queries": {**_obj({"single": _STR, "multi2": _STR, "multi4": _STR}, required=False),
                                "minProperties": 1}})}

SCHEMA: dict[str, Any] = _obj({
    "base": _obj({
        "seed": _INT,
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
        }),
        "warmup": _obj({
            "examples": _POS, "names": _POS, "name_rate": {"type": "number", "minimum": 0, "maximum": 1},
            "steps": _INT, "batch_size": _POS, "learning_rate": _NUM,
        }),
    }),
    "subset_2k": _obj({"size": _POS}),
    "build_db": _obj({"embedder": {"enum": ["color_layout", "clip"]}, "embedder_kwargs": {"type": "object"}}),
    "caption": _obj({
        "backend": {"enum": ["hf", "static"]},
        "batch_size": _POS, "max_new_tokens": _POS,
        "detector": {"enum": ["foreground", "owlv2", "yolo_world"]}, "detector_kwargs": {"type": "object"},
        "max_pixels": {"type": ["integer", "null"], "minimum": 3136},
        "top_k": _obj({"single": _POS, "multi2": _POS, "multi4": _POS}),
    }),
    "train_grpo_lora": _obj({
        "launch": _STR,
        "rollout_backend": {"enum": ["hf", "static"]},
        "protocol": {"enum": ["repic", "strict"]},
        "rewards": {"type": "array", "items": _STR, "minItems": 1},
        "heldout_eval": _INT,
        "resize": _obj({"multi_short_side": _POS, "single_short_side": _POS}),
        "lora": {"type": "object"},
        "grpo": {"type": "object"},
    }),
    "score": _obj({"protocol": {"enum": ["repic", "strict"]}}),
    "merge_lora": _obj({"n_inputs": _POS, "max_new_tokens": _POS,
                        "tolerance": _obj({"float32": {"type": "number", "minimum": 0},
                                           "bfloat16": {"type": "number", "minimum": 0}})}),
    "report": _obj({"max_queries": _POS}),
    "judge_llm": _obj({
        "backend": {"enum": ["local", "openai", "none"]},
        "model": _STR, "max_pairs": _POS, "max_requests": _INT, "max_new_tokens": _POS,
        "openai": _obj({"base_url": _STR, "model": _STR, "api_key_env": _STR, "max_retries": _INT,
                        "backoff_s": {"type": "number", "minimum": 0}, "timeout_s": {"type": "number", "minimum": 0}}),
    }),
})


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """Overlay `overlay` onto `base` (dicts merge key by key; everything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def validate(params: dict[str, Any], source: str = "params.yaml") -> None:
    """Raise RepicError naming the first offending key (dotted path) and what was expected."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(SCHEMA)
    errors = sorted(validator.iter_errors(params), key=lambda e: list(e.absolute_path))
    if not errors:
        return
    err = errors[0]
    where = ".".join(str(p) for p in err.absolute_path)
    if err.validator == "additionalProperties":
        extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
        key = ".".join([where, extra[0]]) if where else extra[0]
        raise RepicError(f"{source}: {key}: unknown key (expected one of {sorted(err.schema['properties'])})")
    if err.validator == "required":
        raise RepicError(f"{source}: {where or '<top>'}: {err.message}")
    raise RepicError(f"{source}: {where}: {err.message}")


def load_params(path: str | os.PathLike = "params.yaml") -> dict[str, Any]:
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
    return params


def check_fields(section: str, values: dict[str, Any], dataclass_type: type) -> None:
    """Keys of a library-config section must be fields of that library's dataclass (GRPOConfig, LoraConfig)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(dataclass_type)}
    for key in values:
        if key not in names:
            raise RepicError(f"params.yaml: {section}.{key}: unknown key (not a field of {dataclass_type.__name__})")


def apply_overlay(params_path: str | os.PathLike, overlay_path: str | os.PathLike) -> dict[str, Any]:
    """Rewrite `params_path` as itself overlaid with `overlay_path` (validated first, written atomically)."""
    from repic.io import write_text

    base = load_params(params_path)
    overlay = yaml.safe_load(Path(overlay_path).read_text(encoding="utf-8")) or {}
    merged = deep_merge(base, overlay)
    validate(merged, f"{params_path} + {overlay_path}")
    header = f"# {params_path} with {overlay_path} applied (git checkout {params_path} undoes it)\n"
    write_text(params_path, header + yaml.safe_dump(merged, sort_keys=False, width=110))
    return merged


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m repic.params", description="validate or overlay params.yaml")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="validate params.yaml").add_argument("--params", default="params.yaml")
    ap = sub.add_parser("apply", help="overlay a config (e.g. configs/paper.yaml) onto params.yaml")
    ap.add_argument("overlay")
    ap.add_argument("--params", default="params.yaml")
    args = p.parse_args(argv)
    try:
        if args.command == "check":
            load_params(args.params)
        else:
            apply_overlay(args.params, args.overlay)
    except RepicError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
