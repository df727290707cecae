#!/usr/bin/env python3
"""Asks Portcullis directly from a Python service: IsAuthorized for one action,
and BatchIsAuthorized for the buttons a UI may show (one token verification).

    pip install -r examples/python/requirements.txt
    export PORTCULLIS_TOKEN=$(portcullis token mint --key examples/quickstart/dev-key.pem --sub alice --scope orders:read)
    python examples/python/is_authorized.py 127.0.0.1:9191

Arguments: [ADDR] [TOKEN]; the address defaults to 127.0.0.1:9191, the token
to $PORTCULLIS_TOKEN.

The `portcullis.v1` stubs are generated at run time from
proto/portcullis/v1/authorizer.proto with grpcio-tools, into a temporary
folder (see `load_stubs`). In your own service, generate them once instead:

    python -m grpc_tools.protoc -I proto --python_out=. --grpc_python_out=. \\
        proto/portcullis/v1/authorizer.proto
"""

import atexit
import importlib
import json
import os
import shutil
import sys
import tempfile

import grpc

PROTO_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "proto")
PROTO = "portcullis/v1/authorizer.proto"


def load_stubs():
    """Compiles the Authorizer proto with grpcio-tools and imports the result."""
    import importlib.resources

    from grpc_tools import protoc

    out = tempfile.mkdtemp(prefix="portcullis-stubs-")
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    # grpcio-tools ships the well-known types (google/protobuf/struct.proto).
    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            PROTO,
        ]
    )
    if status != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")
    sys.path.insert(0, out)
    messages = importlib.import_module("portcullis.v1.authorizer_pb2")
    services = importlib.import_module("portcullis.v1.authorizer_pb2_grpc")
    return messages, services


def context(method, path, params):
    """The context the quickstart schema asks for (Portcullis adds `token`)."""
    return json.dumps(
        {
            "http": {"method": method, "path": path, "host": "orders.example.test", "scheme": "https"},
            "path_params": params,
        }
    )


def main(argv):
    addr = argv[1] if len(argv) > 1 else "127.0.0.1:9191"
    token = argv[2] if len(argv) > 2 else os.environ.get("PORTCULLIS_TOKEN")
    if not token:
        print("give a token as the second argument or in PORTCULLIS_TOKEN", file=sys.stderr)
        return 2
    pb, pb_grpc = load_stubs()
    credential = pb.Credential(access_token=token)
    orders = pb.Entity(type="Application", id="orders")

    with grpc.insecure_channel(addr) as channel:
        authorizer = pb_grpc.AuthorizerStub(channel)

        # May this caller read order 42?
        answer = authorizer.IsAuthorized(
            pb.IsAuthorizedRequest(
                credential=credential,
                action="get /orders/{id}",
                resource=orders,
                context_json=context("GET", "/orders/42", {"id": "42"}),
            ),
            timeout=5,
        )
        print(
            f"IsAuthorized get /orders/{{id}}: {pb.Decision.Name(answer.decision)} "
            f"reason={answer.reason} policies=[{','.join(answer.determining_policies)}] "
            f"principal={answer.principal}"
        )

        # Which buttons may the UI show? One call, one token verification.
        buttons = [
            ("list", "get /orders", "GET", "/orders", {}),
            ("view", "get /orders/{id}", "GET", "/orders/42", {"id": "42"}),
            ("create", "post /orders", "POST", "/orders", {}),
            ("delete", "delete /orders/{id}", "DELETE", "/orders/42", {"id": "42"}),
        ]
        batch = authorizer.BatchIsAuthorized(
            pb.BatchIsAuthorizedRequest(
                credential=credential,
                requests=[
                    pb.AuthorizationRequest(
                        action=action, resource=orders, context_json=context(method, path, params)
                    )
                    for _, action, method, path, params in buttons
                ],
            ),
            timeout=5,
        )
        for (button, *_), result in zip(buttons, batch.results):
            print(f"button {button}: {pb.Decision.Name(result.decision)} reason={result.reason}")

        # A request that does not fit the schema names the offending field.
        try:
            authorizer.IsAuthorized(
                pb.IsAuthorizedRequest(
                    credential=credential,
                    action="get /orders",
                    resource=pb.Entity(type="Invoice", id="7"),
                ),
                timeout=5,
            )
        except grpc.RpcError as e:
            print(f"invalid request: {e.code().name}: {e.details()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
