#!/usr/bin/env python3
"""Checks an Envoy configuration without Envoy: parses the YAML into Envoy's
own `Bootstrap` message (generated types from the `xds-protos` package), so a
misspelt field, a wrong type or an unknown `@type` fails.

    python examples/envoy/validate_config.py examples/envoy/envoy.yaml

On success it prints the parsed message as JSON (field names as in the YAML)
and exits 0; on failure it prints the parser's error and exits 1.
Needs: pip install -r examples/python/requirements.txt
"""

import importlib
import json
import pkgutil
import sys

import yaml
from google.protobuf import json_format

from envoy.config.bootstrap.v3 import bootstrap_pb2


def type_urls(node):
    """Every `@type` in the document."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "@type" and isinstance(value, str):
                yield value
            else:
                yield from type_urls(value)
    elif isinstance(node, list):
        for item in node:
            yield from type_urls(item)


def register(type_url):
    """Imports the generated modules of the package declaring `type_url`, so
    that the `Any` fields naming it can be parsed."""
    full_name = type_url.rsplit("/", 1)[-1]
    package = full_name.rsplit(".", 1)[0]
    try:
        module = importlib.import_module(package)
    except ImportError:
        return  # the parser reports the unknown type by name
    for info in pkgutil.iter_modules(module.__path__):
        if info.name.endswith("_pb2"):
            importlib.import_module(f"{package}.{info.name}")


def parse(path):
    with open(path, encoding="utf-8") as f:
        document = yaml.safe_load(f)
    for url in set(type_urls(document)):
        register(url)
    bootstrap = bootstrap_pb2.Bootstrap()
    json_format.ParseDict(document, bootstrap)
    return bootstrap


def main(argv):
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        bootstrap = parse(argv[1])
    except (json_format.ParseError, yaml.YAMLError, OSError) as e:
        print(f"{argv[1]}: not a valid Envoy Bootstrap: {e}", file=sys.stderr)
        return 1
    print(json.dumps(json_format.MessageToDict(bootstrap, preserving_proto_field_name=True), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
