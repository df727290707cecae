#!/usr/bin/env python3
"""Calls Portcullis' Check from a Python service, as Envoy does: Envoy's own
generated messages and stubs (the `xds-protos` package) over `grpcio`.

    pip install -r examples/python/requirements.txt
    export PORTCULLIS_TOKEN=$(portcullis token mint --key examples/quickstart/dev-key.pem --sub alice --scope orders:read)
    python examples/python/check_client.py 127.0.0.1:9191

Arguments: [ADDR] [TOKEN]; the address defaults to 127.0.0.1:9191, the token
to $PORTCULLIS_TOKEN.
"""

import os
import sys

import grpc
from envoy.config.core.v3 import address_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc


def peer(ip, port):
    return attribute_context_pb2.AttributeContext.Peer(
        address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address=ip, port_value=port)
        )
    )


def check_request(method, path, token):
    """The CheckRequest Envoy sends for `method path` with a bearer token."""
    headers = {
        ":method": method,
        ":path": path,
        ":authority": "orders.example.test",
        ":scheme": "https",
        "authorization": f"Bearer {token}",
        "user-agent": "check-client-example",
    }
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        id="example-1",
        method=method,
        path=path,
        host="orders.example.test",
        scheme="https",
        protocol="HTTP/1.1",
        headers=headers,
    )
    return external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            source=peer("10.1.2.3", 40000),
            destination=peer("10.0.0.10", 8080),
            request=attribute_context_pb2.AttributeContext.Request(http=http),
            context_extensions={"portcullis.mode": "enforce"},
        )
    )


def main(argv):
    addr = argv[1] if len(argv) > 1 else "127.0.0.1:9191"
    token = argv[2] if len(argv) > 2 else os.environ.get("PORTCULLIS_TOKEN")
    if not token:
        print("give a token as the second argument or in PORTCULLIS_TOKEN", file=sys.stderr)
        return 2
    with grpc.insecure_channel(addr) as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        for method, path in [("GET", "/orders/42"), ("POST", "/orders")]:
            response = stub.Check(check_request(method, path, token), timeout=5)
            if response.HasField("ok_response"):
                status = 200
            else:
                status = response.denied_response.status.code
            metadata = response.dynamic_metadata.fields
            policies = ",".join(v.string_value for v in metadata["policies"].list_value.values)
            print(
                f"{method} {path} -> {status} {metadata['reason'].string_value} "
                f"policies=[{policies}] decision_id={metadata['decision_id'].string_value}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
