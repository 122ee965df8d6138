"""Test upstream: echoes what it received as JSON and logs every request it served.

  upstream.py BIND_IP PORT {CERT KEY | plain} LOG_FILE

GET /sse streams three events 300 ms apart; POST bodies are counted, never stored.
"""
import http.server
import json
import ssl
import sys
import time
import urllib.parse


class Echo(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def record(self, extra):
        entry = {
            "method": self.command,
            "path": self.path,
            "host": self.headers.get("Host"),
            "authorization": self.headers.get_all("Authorization") or [],
            "proxy_authorization": self.headers.get_all("Proxy-Authorization") or [],
            "tls": isinstance(self.connection, ssl.SSLSocket),
            "port": self.server.server_address[1],
        }
        entry.update(extra)
        with open(LOG, "a") as f:
            f.write(json.dumps(entry) + "\n")
        return entry

    def reply(self, entry):
        body = json.dumps(entry).encode() + b"\n"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        entry = self.record({})
        if self.path == "/sse":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            for i in range(3):
                self.wfile.write(f"data: event-{i} at {time.monotonic():.3f}\n\n".encode())
                self.wfile.flush()
                time.sleep(0.3)
            self.close_connection = True
            # A close-delimited body ends with TLS close_notify; without it the end is
            # indistinguishable from a truncation (and Robin treats it as one).
            if hasattr(self.connection, "unwrap"):
                try:
                    self.connection.unwrap()
                except OSError:
                    pass
            return
        self.reply(entry)

    def do_POST(self):
        if self.path == "/token":
            return self.token_endpoint()
        remaining = int(self.headers.get("Content-Length", "0"))
        total = 0
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 1 << 20))
            if not chunk:
                break
            total += len(chunk)
            remaining -= len(chunk)
        self.reply(self.record({"received": total}))

    def token_endpoint(self):
        """An OAuth 2.0 token endpoint (RFC 8693 token exchange) that trades a subject token."""
        length = int(self.headers.get("Content-Length", "0"))
        form = urllib.parse.parse_qs(self.rfile.read(length).decode())
        form = {k: v[0] for k, v in form.items()}
        self.record({"form": form})
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:token-exchange":
            body, status = {"error": "unsupported_grant_type"}, 400
        else:
            subject = form.get("subject_token", "")
            body = {
                "access_token": "exchanged." + subject + "." + form.get("audience", "none"),
                "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
                "token_type": "Bearer",
                "expires_in": 300,
            }
            status = 200
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


BIND, PORT, LOG = sys.argv[1], int(sys.argv[2]), sys.argv[-1]
srv = http.server.ThreadingHTTPServer((BIND, PORT), Echo)
if sys.argv[3] != "plain":
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(sys.argv[3], sys.argv[4])
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print("ready", flush=True)
srv.serve_forever()
