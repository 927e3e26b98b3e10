#!/usr/bin/env python3
"""An OTLP/HTTP logs receiver for tests/tests/export.rs.

Each POST body is decoded with the official OpenTelemetry protobuf definitions (the PyPI
package opentelemetry-proto, generated from the .proto files) by the proto3 JSON parser
(google.protobuf.json_format.Parse, strict: an unknown field is an error). One JSON line
per request goes to --out: the request's number, the status answered, and what was decoded
(MessageToDict) or why it could not be; `canonical` says whether the body is exactly the
canonical proto3 JSON of what it decoded to (lowerCamelCase names, int64 as strings, enums
as integers, no default values).

--fail-first N answers 503 to the first N requests (their bodies are decoded and logged
too), to prove the sender retries. --hang accepts connections and never answers.

Listens on 127.0.0.1, on a port of its own choosing, written to --port-file once it
listens. Runs until killed.
"""

import argparse
import json
import os
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from google.protobuf import json_format
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--port-file", required=True)
    ap.add_argument("--fail-first", type=int, default=0)
    ap.add_argument("--hang", action="store_true")
    args = ap.parse_args()

    if args.hang:
        hang(args.port_file)
        return

    lock = threading.Lock()
    state = {"n": 0}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            with lock:
                state["n"] += 1
                n = state["n"]
            status = 503 if n <= args.fail_first else 200
            line = {
                "request": n,
                "status": status,
                "path": self.path,
                "content_type": self.headers.get("Content-Type"),
            }
            try:
                msg = json_format.Parse(body, ExportLogsServiceRequest())
                decoded = json_format.MessageToDict(msg, use_integers_for_enums=True)
                line["decoded"] = decoded
                line["canonical"] = json.loads(body) == decoded
            except Exception as e:  # the test reads the reason
                line["error"] = f"{type(e).__name__}: {e}"
                status = 400
                line["status"] = status
            with lock:
                with open(args.out, "a") as f:
                    f.write(json.dumps(line) + "\n")
            reply = b"{}" if status == 200 else b'{"message":"try again"}'
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    write_port(args.port_file, server.server_address[1])
    server.serve_forever()


def hang(port_file):
    """Accepts connections, reads nothing, answers nothing."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    write_port(port_file, s.getsockname()[1])
    held = []
    while True:
        c, _ = s.accept()
        held.append(c)


def write_port(path, port):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(port))
    # Renamed into place: the test never reads half a number.
    os.rename(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
