"""A threaded HTTP server for the e2e matrix: GET /healthz answers "ok" (the readiness probe),
GET /state counts the request and answers the state as JSON (ticks, requests, and the token drawn
at start: a restored server keeps it, a fresh one draws another). Every tick prints one line in the
counter format the harness parses: "<n> ticks=<n> requests=<count>"."""
import http.server
import json
import os
import secrets
import threading
import time

TOKEN = secrets.token_hex(8)
lock = threading.Lock()
state = {"ticks": 0, "requests": 0}


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.path == "/healthz":
            body = b"ok\n"
        else:
            with lock:
                state["requests"] += 1
                body = json.dumps(dict(state, token=TOKEN, pid=os.getpid())).encode() + b"\n"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def main():
    srv = http.server.ThreadingHTTPServer(("", int(os.environ.get("PORT", "8080"))), Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    print(f"start pid={os.getpid()} token={TOKEN}", flush=True)
    n = 0
    while True:
        with lock:
            state["ticks"] = n
            line = f"{n} ticks={n} requests={state['requests']} token={TOKEN}"
        print(line, flush=True)
        n += 1
        time.sleep(0.5)


if __name__ == "__main__":
    main()
