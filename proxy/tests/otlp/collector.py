"""A fake OTLP/HTTP trace collector, for proxy/src/otlp/tests.rs.

    python collector.py

Decodes every POST body with the official protobuf classes (PyPI's
opentelemetry-proto, pinned in requirements.txt) as an
``ExportTraceServiceRequest``, prints each span as one JSON line, and answers
200 with an empty ``ExportTraceServiceResponse``, keeping the connection.

It serves the listening socket it gets as standard input, if it gets one (so a
test can hold a port that refuses connections, then hand it over); otherwise it
binds 127.0.0.1 port 0. Its first line is
``otlp collector (opentelemetry-proto V, protobuf V) listening on 127.0.0.1:PORT``.
It runs until killed, or until the process that started it is gone.

Each span line holds the whole span as ``MessageToDict`` gives it (every field,
defaults included, so a stray field shows), with ids in hex, times and integer
attributes as numbers, and attributes as ``{"key": K, "value": {"KIND": V}}``;
beside it the resource, the scope and the request: its path, content type,
client port, and whether re-encoding the decoded message gives back the same
bytes (serin's encoding is then exactly the official one).
"""

import importlib.metadata
import json
import os
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from google.protobuf.json_format import MessageToDict
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

PRINT_LOCK = threading.Lock()


def as_dict(message):
    return MessageToDict(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
    )


def attributes(key_values):
    out = []
    for kv in key_values:
        kind = kv.value.WhichOneof("value")
        out.append({"key": kv.key, "value": {kind: getattr(kv.value, kind)}})
    return out


def span_dict(span):
    d = as_dict(span)
    for field in ("trace_id", "span_id", "parent_span_id"):
        d[field] = getattr(span, field).hex()
    d["start_time_unix_nano"] = span.start_time_unix_nano
    d["end_time_unix_nano"] = span.end_time_unix_nano
    d["attributes"] = attributes(span.attributes)
    return d


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        request = ExportTraceServiceRequest.FromString(body)
        about = {
            "path": self.path,
            "content_type": self.headers.get("content-type"),
            "client_port": self.client_address[1],
            "canonical": request.SerializeToString() == body,
        }
        lines = []
        for rs in request.resource_spans:
            resource = as_dict(rs.resource)
            resource["attributes"] = attributes(rs.resource.attributes)
            for ss in rs.scope_spans:
                scope = as_dict(ss.scope)
                for span in ss.spans:
                    lines.append(json.dumps({
                        "request": about,
                        "resource": resource,
                        "scope": scope,
                        "span": span_dict(span),
                    }))
        with PRINT_LOCK:
            for line in lines:
                print(line, flush=True)
        answer = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format, *args):
        pass


def listening_socket():
    try:
        sock = socket.socket(fileno=0)
    except OSError:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
    return sock


def exit_with_parent():
    parent = os.getppid()
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(0)


def main():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = listening_socket()
    server.daemon_threads = True
    host, port = server.socket.getsockname()[:2]
    versions = ", ".join(
        f"{name} {importlib.metadata.version(name)}"
        for name in ("opentelemetry-proto", "protobuf")
    )
    print(f"otlp collector ({versions}) listening on {host}:{port}", flush=True)
    threading.Thread(target=exit_with_parent, daemon=True).start()
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
