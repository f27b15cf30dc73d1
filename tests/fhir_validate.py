#!/usr/bin/env python3
"""Validate FHIR R4 JSON resources with the models of `fhir.resources`.

Usage: fhir_validate.py DIR

Every `*.json` file in DIR is one FHIR resource. Each is parsed with the
`fhir.resources` 6.1.0 model for its `resourceType` (FHIR 4.0.1, pydantic v1);
a Bundle's entries and any contained resources are parsed by the same call.

pydantic v1 models let through much that FHIR forbids, so on top of the model
this also rejects:
  * JSON that is not an object, duplicate keys, a missing `resourceType`;
  * empty strings, empty arrays, empty objects, and nulls (except the nulls
    FHIR allows: items of a `_name` primitive-extension array);
  * coerced primitives: the model turns 42 into "42", "yes" into true and
    "3" into 3, so each primitive's JSON type is checked against its FHIR
    type (boolean, integer/unsignedInt/positiveInt with their ranges,
    decimal, and string for the rest);
  * strings that do not fully match the FHIR R4 regex of their type (the
    models match only a prefix, so "2024-01-02T03:04" passed as a dateTime);
  * xhtml that is not a well-formed XHTML <div>;
  * codes outside a closed list the models carry for required bindings
    (e.g. Patient.gender; lists the spec leaves open, marked "+", are skipped).

Prints `ok <file> <resourceType>` or `FAIL <file>: <reason>` per file.
Exit status: 0 all valid, 1 any invalid, 2 usage or environment error.
"""

import json
import math
import os
import re
import sys
import xml.etree.ElementTree as ElementTree

INT_MIN, INT_MAX = -(2**31), 2**31 - 1
XHTML_DIV = "{http://www.w3.org/1999/xhtml}div"

# FHIR R4 (4.0.1) datatype regexes, matched against the whole value. base64Binary
# has the '/' that the R4 table left out (an erratum fixed in later releases).
REGEX = {
    name: re.compile(pattern)
    for name, pattern in {
        "string": r"[ \r\n\t\S]+",
        "uri": r"\S*",
        "url": r"\S*",
        "canonical": r"\S*",
        "base64Binary": r"(\s*([0-9a-zA-Z+/=]){4}\s*)+",
        "instant": r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)-(0[1-9]|1[0-2])"
        r"-(0[1-9]|[1-2][0-9]|3[0-1])T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)"
        r"(\.[0-9]+)?(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00))",
        "date": r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)"
        r"(-(0[1-9]|1[0-2])(-(0[1-9]|[1-2][0-9]|3[0-1]))?)?",
        "dateTime": r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)"
        r"(-(0[1-9]|1[0-2])(-(0[1-9]|[1-2][0-9]|3[0-1])"
        r"(T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?"
        r"(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00)))?)?)?",
        "time": r"([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?",
        "code": r"[^\s]+(\s[^\s]+)*",
        "oid": r"urn:oid:[0-2](\.(0|[1-9][0-9]*))+",
        "id": r"[A-Za-z0-9\-.]{1,64}",
        "markdown": r"\s*(\S|\s)*",
        "uuid": r"urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
    }.items()
}
INTEGER_RANGE = {
    "integer": (INT_MIN, INT_MAX),
    "unsignedInt": (0, INT_MAX),
    "positiveInt": (1, INT_MAX),
}


class Invalid(Exception):
    pass


def no_duplicate_keys(pairs):
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise Invalid(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def check_json(value, path, null_ok=False):
    """Empty strings, arrays and objects, and nulls, anywhere."""
    if value is None:
        if not null_ok:
            raise Invalid(f"{path}: null")
    elif isinstance(value, str):
        if value == "":
            raise Invalid(f"{path}: empty string")
    elif isinstance(value, list):
        if not value:
            raise Invalid(f"{path}: empty array")
        # FHIR JSON keeps a primitive array and its `_name` extension array
        # aligned with nulls; nowhere else is null allowed.
        items_null_ok = path.rsplit(".", 1)[-1].startswith("_")
        for i, item in enumerate(value):
            if isinstance(item, list):
                raise Invalid(f"{path}[{i}]: array in an array")
            check_json(item, f"{path}[{i}]", items_null_ok)
    elif isinstance(value, dict):
        if not value:
            raise Invalid(f"{path}: empty object")
        for key, item in value.items():
            check_json(item, f"{path}.{key}")
    elif isinstance(value, float) and not math.isfinite(value):
        raise Invalid(f"{path}: non-finite number")


def primitive_name(field):
    """The FHIR primitive type name of a model field, or None if not primitive."""
    from fhir.resources import fhirtypes

    kind = field.type_
    if kind is bool:
        return "boolean"
    if isinstance(kind, type) and issubclass(kind, fhirtypes.Primitive):
        return kind.__visit_name__
    return None


def check_primitive(name, value, path):
    if name == "boolean":
        if not isinstance(value, bool):
            raise Invalid(f"{path}: boolean must be JSON true/false, not {value!r}")
    elif name in INTEGER_RANGE:
        low, high = INTEGER_RANGE[name]
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid(f"{path}: {name} must be a JSON integer, not {value!r}")
        if not low <= value <= high:
            raise Invalid(f"{path}: {name} {value} out of range {low}..{high}")
    elif name == "decimal":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise Invalid(f"{path}: decimal must be a JSON number, not {value!r}")
    else:
        if not isinstance(value, str):
            raise Invalid(f"{path}: {name} must be a JSON string, not {value!r}")
        if name == "xhtml":
            try:
                root = ElementTree.fromstring(value)
            except ElementTree.ParseError as e:
                raise Invalid(f"{path}: xhtml is not well-formed XML: {e}") from None
            if root.tag != XHTML_DIV:
                raise Invalid(f"{path}: xhtml must be a <div> in the XHTML namespace")
        elif name in REGEX and not REGEX[name].fullmatch(value):
            raise Invalid(f"{path}: {value!r} is not a valid FHIR {name}")


def check_model(model, obj, path):
    """Walk a parsed model and the JSON it came from together."""
    from pydantic import BaseModel

    fields = {field.alias: field for field in type(model).__fields__.values()}
    for key, value in obj.items():
        here = f"{path}.{key}"
        if key == "resourceType" and "resourceType" not in fields:
            continue
        field = fields.get(key)
        if field is None or key in ("fhir_comments", "resource_type"):
            raise Invalid(f"{here}: not an element of {type(model).__name__}")
        parsed = getattr(model, field.name)
        items = value if isinstance(value, list) else [value]
        parsed_items = parsed if isinstance(parsed, list) else [parsed]
        name = primitive_name(field)
        if name is not None:
            enum = field.field_info.extra.get("enum_values")
            closed = enum and "+" not in enum
            for i, item in enumerate(items):
                at = f"{here}[{i}]" if isinstance(value, list) else here
                check_primitive(name, item, at)
                if closed and item not in enum:
                    raise Invalid(f"{at}: {item!r} is not one of {' | '.join(enum)}")
            continue
        if len(items) != len(parsed_items):
            raise Invalid(f"{here}: the model kept {len(parsed_items)} of {len(items)} items")
        for i, (item, parsed_item) in enumerate(zip(items, parsed_items)):
            at = f"{here}[{i}]" if isinstance(value, list) else here
            if item is None:
                continue  # an aligned null in a `_name` array (check_json allowed it)
            if isinstance(parsed_item, BaseModel) and isinstance(item, dict):
                check_model(parsed_item, item, at)
            elif not isinstance(parsed_item, BaseModel) and isinstance(item, str):
                check_primitive("string", item, at)  # a Union-typed id
            else:
                raise Invalid(f"{at}: unexpected JSON {type(item).__name__}")


def validate(path):
    """The resourceType of the valid resource in `path`; raises Invalid."""
    from fhir.resources import get_fhir_model_class
    from pydantic import ValidationError

    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f, object_pairs_hook=no_duplicate_keys)
    except (ValueError, UnicodeDecodeError) as e:
        raise Invalid(f"not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise Invalid(f"not a JSON object but {type(obj).__name__}")
    kind = obj.get("resourceType")
    if kind is None:
        raise Invalid("no resourceType")
    if not isinstance(kind, str):
        raise Invalid(f"resourceType {kind!r} is not a string")
    check_json(obj, "$")
    try:
        model_class = get_fhir_model_class(kind)
    except KeyError:
        raise Invalid(f"unknown resourceType {kind!r}") from None
    try:
        model = model_class.parse_obj(obj)
    except ValidationError as e:
        raise Invalid(" ".join(str(e).split())) from None
    check_model(model, obj, "$")
    return kind


def main(argv):
    if len(argv) != 2 or not os.path.isdir(argv[1]):
        print(f"usage: {argv[0]} DIR  (every DIR/*.json is one FHIR resource)", file=sys.stderr)
        return 2
    try:
        import fhir.resources
    except ImportError as e:
        print(f"{argv[0]}: {e}; run scripts/test.sh to make target/fhir-venv", file=sys.stderr)
        return 2
    if fhir.resources.__fhir_version__ != "4.0.1":
        print(f"{argv[0]}: fhir.resources has FHIR {fhir.resources.__fhir_version__}, "
              "not 4.0.1 (install fhir.resources==6.1.0)", file=sys.stderr)
        return 2
    names = sorted(n for n in os.listdir(argv[1]) if n.endswith(".json"))
    if not names:
        print(f"{argv[0]}: no *.json files in {argv[1]}", file=sys.stderr)
        return 2
    failed = 0
    for name in names:
        try:
            kind = validate(os.path.join(argv[1], name))
        except Invalid as e:
            failed += 1
            print(f"FAIL {name}: {e}")
        else:
            print(f"ok {name} {kind}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
