#!/usr/bin/env python3
"""Convert a Kubernetes CustomResourceDefinition into a JSON Schema (draft 7) for whole objects.

    python deploy/schemas/crd_to_jsonschema.py CRD.yaml [--version V] [--source TEXT] [--compact] > OUT.json

Takes the served version's `spec.versions[].schema.openAPIV3Schema` (the only served one, or
--version) and keeps its structure, with these changes:

- `apiVersion` and `kind` become constants (group/version, the CRD's kind) and, with `metadata`,
  required; `metadata` gets name/namespace as strings and labels/annotations as string maps (the API
  server validates ObjectMeta itself; a CRD's schema says only `type: object`).
- Kubernetes extensions: `x-kubernetes-int-or-string: true` -> anyOf integer/string (controller-gen
  already writes that anyOf next to it, which is kept); `x-kubernetes-preserve-unknown-fields: true`
  -> the object stays open; `x-kubernetes-embedded-resource: true` -> apiVersion/kind/metadata
  allowed; every other x-kubernetes-* key (list/map types, CEL validations) is dropped.
- OpenAPI 3.0 `nullable: true` -> "null" added to the type; boolean exclusiveMinimum/Maximum -> the
  draft 7 numeric form; `description`, `example` and `externalDocs` are dropped (size).
- Strictness, as `kubectl --validate=strict` (the API server's pruning reported as errors): every
  object schema in a structural position (not inside anyOf/allOf/oneOf/not) that has `properties`,
  no `additionalProperties` and no preserve-unknown-fields gets `additionalProperties: false`.

`$comment` names the source: --source, or else the comment lines at the top of the CRD file (the
vendored copies in crds/ start with repository, path and commit). The output is deterministic:
sorted keys, two-space indent (--compact: none, one line, for a big CRD), a final newline; CI
can regenerate and diff.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

DRAFT = "http://json-schema.org/draft-07/schema#"
DROPPED = {"description", "example", "externalDocs"}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
METADATA = {  # the fields of ObjectMeta a manifest commonly writes, typed; the rest left to the API
    "type": "object",
    "properties": {"name": {"type": "string"}, "namespace": {"type": "string"},
                   "labels": STRING_MAP, "annotations": STRING_MAP},
}
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def convert(node: dict, structural: bool = True) -> dict:
    """One OpenAPI v3 (Kubernetes structural) schema node -> JSON Schema draft 7."""
    if not isinstance(node, dict):
        raise TypeError(f"schema node is {type(node).__name__}, not an object: {node!r}")
    out: dict = {}
    for key, value in node.items():
        if key in DROPPED or key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key == "properties":
            out[key] = {name: convert(sub) for name, sub in value.items()}
        elif key == "items":
            out[key] = convert(value) if isinstance(value, dict) else [convert(v) for v in value]
        elif key == "additionalProperties":
            out[key] = convert(value) if isinstance(value, dict) else value
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [convert(v, structural=False) for v in value]
        elif key == "not":
            out[key] = convert(value, structural=False)
        elif key in ("exclusiveMinimum", "exclusiveMaximum") and isinstance(value, bool):
            bound = "minimum" if key == "exclusiveMinimum" else "maximum"
            if value and bound in node:
                out[key] = node[bound]
        else:  # type, format, pattern, enum, default, required, minimum, maxLength, ...
            out[key] = value
    for key, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if node.get(key) is True:
            out.pop(bound, None)

    if node.get("x-kubernetes-int-or-string") is True:
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") is True:
        if "type" in out:
            out["type"] = [out["type"], "null"]
        if "enum" in out and None not in out["enum"]:
            out["enum"] = [*out["enum"], None]
    if node.get("x-kubernetes-embedded-resource") is True:
        props = out.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
    if (structural and "properties" in out and "additionalProperties" not in out
            and node.get("x-kubernetes-preserve-unknown-fields") is not True):
        out["additionalProperties"] = False
    return out


def header_comment(text: str) -> str:
    """The `Key: value` lines of the comment block the file starts with, joined with "; "."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        line = line.lstrip("#").strip()
        if re.match(r"[A-Z][\w ]*: \S", line):
            lines.append(line)
    return "; ".join(lines)


def crd_to_schema(text: str, version: str | None = None, source: str | None = None) -> dict:
    crds = [d for d in yaml.load_all(text, Loader=Loader)
            if d and d.get("kind") == "CustomResourceDefinition"]
    if len(crds) != 1:
        raise SystemExit(f"expected one CustomResourceDefinition, found {len(crds)}")
    spec = crds[0]["spec"]
    served = [v for v in spec["versions"] if v.get("served")]
    if version is not None:
        served = [v for v in served if v["name"] == version]
    if len(served) != 1:
        names = [v["name"] for v in spec["versions"] if v.get("served")]
        raise SystemExit(f"served versions {names}: pick one with --version" if version is None
                         else f"{version} is not a served version of {crds[0]['metadata']['name']} ({names})")
    (ver,) = served
    group, kind = spec["group"], spec["names"]["kind"]
    api_version = f"{group}/{ver['name']}"

    schema = convert(ver["schema"]["openAPIV3Schema"])
    schema.setdefault("properties", {})
    schema["properties"].update({
        "apiVersion": {"type": "string", "const": api_version},
        "kind": {"type": "string", "const": kind},
        "metadata": METADATA,
    })
    schema["type"] = "object"
    schema["required"] = ["apiVersion", "kind", "metadata",
                          *[r for r in schema.get("required", []) if r not in ("apiVersion", "kind", "metadata")]]
    schema["additionalProperties"] = False
    comment = source if source is not None else header_comment(text)
    return {
        "$schema": DRAFT,
        "$comment": (f"Generated by deploy/schemas/crd_to_jsonschema.py from the CRD "
                     f"{crds[0]['metadata']['name']}, version {ver['name']}"
                     + (f"; source: {comment}" if comment else "") + ". Do not edit by hand."),
        "title": f"{kind} ({api_version})",
        **schema,
    }


def dump(schema: dict, compact: bool = False) -> str:
    layout = {"separators": (",", ":")} if compact else {"indent": 2}
    return json.dumps(schema, sort_keys=True, ensure_ascii=False, **layout) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("crd", type=Path, help="CustomResourceDefinition YAML file")
    parser.add_argument("--version", help="the served version to convert (needed when several are served)")
    parser.add_argument("--source", help="where the CRD came from, for $comment (default: the file's header comment)")
    parser.add_argument("--compact", action="store_true", help="no indentation (a third of the size)")
    args = parser.parse_args(argv)
    schema = crd_to_schema(args.crd.read_text(encoding="utf-8"), args.version, args.source)
    sys.stdout.write(dump(schema, args.compact))
    return 0


if __name__ == "__main__":
    sys.exit(main())
