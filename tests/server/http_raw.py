#!/usr/bin/env python3
"""tests/server/http_raw.py [BINARY] -- HTTP/1.1 and the server's defences, over raw sockets.

Starts `BINARY --server` (default ./ds4) on the tiny model with a test script,
on 127.0.0.1 (PORT from the environment, else a free port), and speaks HTTP
byte by byte: keep-alive, pipelining, HEAD, chunked bodies, strict framing,
half-close, Host/Origin/Content-Type, long API keys, slot reclaim under a
trickle attack, queue notes, /metrics, the JSON memory budget (VmHWM of the
server process), typed fields and duplicate keys. Python standard library
only. Ends with "N passed, N failed"; exit status 0 iff all passed.

    python3 tests/server/http_raw.py ./ds4
    python3 tests/server/http_raw.py --measure BINARY   # VmHWM for the 8 MB body
"""
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

MODEL = os.environ.get("MODEL", "vectors/tiny.gguf")
KEY = "raw-key-456"
passed = failed = 0


def check(ok, name, detail=""):
    global passed, failed
    if ok:
        passed += 1
        print(f"ok   {name}")
    else:
        failed += 1
        print(f"FAIL {name}{': ' + detail if detail else ''}")


class Server:
    """One `ds4 --server` process; stop() always reaps it."""

    def __init__(self, binary, *extra, script=None):
        self.tmp = tempfile.mkdtemp()
        port_file = os.path.join(self.tmp, "port")
        port = os.environ.get("PORT", "0")
        args = [binary, "--server", "-m", MODEL, "--port", port, "--port-file", port_file, "--ctx", "4096"]
        if script is not None:
            path = os.path.join(self.tmp, "script.json")
            with open(path, "w") as f:
                json.dump(script, f)
            args += ["--test-script", path]
        self.err = open(os.path.join(self.tmp, "stderr"), "w+")
        self.proc = subprocess.Popen(args + list(extra), stdout=self.err, stderr=self.err)
        self.port = None
        for _ in range(200):
            if os.path.exists(port_file) and open(port_file).read().strip():
                self.port = int(open(port_file).read())
                break
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)

    def stderr(self):
        self.err.flush()
        with open(self.err.name) as f:
            return f.read()

    def vmhwm_kb(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        return -1

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.err.close()


def connect(port, timeout=10):
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.settimeout(timeout)
    return s


def recv_until(s, buf, marker):
    while marker not in buf:
        data = s.recv(65536)
        if not data:
            raise EOFError("connection closed")
        buf += data
    return buf


def read_chunked(s, buf):
    body = b""
    while True:
        buf = recv_until(s, buf, b"\r\n")
        line, buf = buf.split(b"\r\n", 1)
        size = int(line.split(b";")[0], 16)
        while len(buf) < size + 2:
            data = s.recv(65536)
            if not data:
                raise EOFError("closed inside a chunk")
            buf += data
        body += buf[:size]
        buf = buf[size + 2:]
        if size == 0:
            return body, buf


def read_response(s, buf=b"", head_only=False):
    """One response from s: (status, {name: value}, body, leftover bytes). 1xx are skipped."""
    while True:
        buf = recv_until(s, buf, b"\r\n\r\n")
        head, buf = buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
        if 100 <= status < 200:
            continue
        break
    if head_only:
        return status, headers, b"", buf
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body, buf = read_chunked(s, buf)
    else:
        n = int(headers.get("content-length", "0"))
        while len(buf) < n:
            data = s.recv(65536)
            if not data:
                break
            buf += data
        body, buf = buf[:n], buf[n:]
    return status, headers, body, buf


def request(method, path, port, body=None, headers=None, ctype="application/json", key=KEY):
    h = {"Host": f"127.0.0.1:{port}"}
    if key:
        h["Authorization"] = f"Bearer {key}"
    if body is not None:
        h["Content-Type"] = ctype
        h["Content-Length"] = str(len(body))
    h.update(headers or {})
    text = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items() if v is not None)
    return text.encode() + b"\r\n" + (body or b"")


def exchange(port, raw, head_only=False, timeout=10):
    s = connect(port, timeout)
    try:
        s.sendall(raw)
        return read_response(s, head_only=head_only)
    finally:
        s.close()


def chat_body(text, **extra):
    req = {"model": "deepseek-chat", "messages": [{"role": "user", "content": text}], "max_tokens": 50}
    req.update(extra)
    return json.dumps(req).encode()


def is_closed(s, wait):
    s.settimeout(wait)
    try:
        return s.recv(1) == b""
    except socket.timeout:
        return False
    except ConnectionError:
        return True


# ---------------------------------------------------------------- the tests

def test_keep_alive(port):
    s = connect(port)
    s.sendall(request("GET", "/health", port))
    st1, h1, b1, rest = read_response(s)
    s.sendall(request("GET", "/v1/models", port))
    st2, h2, b2, rest = read_response(s, rest)
    check(st1 == 200 and h1.get("connection") == "keep-alive" and st2 == 200 and b"deepseek" in b2,
          "keep-alive: two requests on one connection", f"{st1} {h1.get('connection')} {st2}")
    s.sendall(request("GET", "/health", port) + request("GET", "/health", port)
              + request("GET", "/health", port, headers={"Connection": "close"}))
    got = []
    for _ in range(3):
        st, h, b, rest = read_response(s, rest)
        got.append((st, h.get("connection")))
    check(got == [(200, "keep-alive"), (200, "keep-alive"), (200, "close")] and is_closed(s, 2),
          "pipelined: three requests in one write, three answers, closed after 'Connection: close'",
          str(got))
    s.close()


def test_keep_alive_limits(binary):
    srv = Server(binary, "--keepalive-requests", "2", "--keepalive-timeout", "1")
    try:
        s = connect(srv.port)
        s.sendall(request("GET", "/health", srv.port, key=None))
        st1, h1, _, rest = read_response(s)
        s.sendall(request("GET", "/health", srv.port, key=None))
        st2, h2, _, rest = read_response(s, rest)
        check(h1.get("keep-alive", "").startswith("timeout=1") and h2.get("connection") == "close"
              and is_closed(s, 2), "--keepalive-requests 2: the second answer closes",
              f"{h1.get('keep-alive')} {h2.get('connection')}")
        s.close()
        s = connect(srv.port)
        s.sendall(request("GET", "/health", srv.port, key=None))
        read_response(s)
        t0 = time.time()
        closed = is_closed(s, 4)
        check(closed and 0.5 < time.time() - t0 < 3, "--keepalive-timeout 1: an idle connection is closed",
              f"after {time.time() - t0:.1f} s")
        s.close()
    finally:
        srv.stop()


def test_head(port):
    s = connect(port)
    s.sendall(request("HEAD", "/health", port, key=None) + request("GET", "/health", port, key=None))
    st, h, _, rest = read_response(s, head_only=True)
    st2, h2, b2, rest = read_response(s, rest)
    check(st == 200 and h.get("content-length") == "15" and st2 == 200 and b2 == b'{"status":"ok"}',
          "HEAD: the headers of GET, no body (the next answer starts right after)",
          f"{st} {h} then {st2} {b2!r}")
    s.close()


def chunked(data, pieces):
    out, step = b"", max(1, len(data) // pieces)
    for i in range(0, len(data), step):
        part = data[i:i + step]
        out += f"{len(part):x};ext=1\r\n".encode() + part + b"\r\n"
    return out + b"0\r\nX-Trailer: yes\r\n\r\n"


def test_chunked(port):
    body = chunked(chat_body("unicode please"), 7)
    head = request("POST", "/v1/chat/completions", port, headers={"Transfer-Encoding": "chunked"})
    # request() sets no Content-Length without a body; add the type by hand.
    head = head.replace(b"\r\n\r\n", b"\r\nContent-Type: application/json\r\n\r\n")
    s = connect(port)
    s.sendall(head + body[:5])
    time.sleep(0.1)
    for i in range(5, len(body), 13):
        s.sendall(body[i:i + 13])
    st, h, b, rest = read_response(s)
    check(st == 200 and "llo" in b.decode("utf-8", "replace"), "chunked request body, sent in pieces: 200",
          f"{st} {b[:200]!r}")
    s.sendall(request("GET", "/health", port, key=None))
    st2, _, _, _ = read_response(s, rest)
    check(st2 == 200, "keep-alive after a chunked body")
    s.close()
    big = b"0" * 2000000
    st, _, b, _ = exchange(port, head + f"{len(big):x}\r\n".encode() + big + b"\r\n0\r\n\r\n")
    check(st == 413, "chunked body over --max-body: 413", f"{st} {b[:100]!r}")
    st, _, b, _ = exchange(port, head + b"zz\r\nhello\r\n0\r\n\r\n")
    check(st == 400 and b"chunked" in b, "malformed chunk size: 400", f"{st} {b[:100]!r}")


def test_framing(port):
    body = chat_body("unicode please")
    n = len(body)
    for value in [f"+{n}", f"{n}, {n}", f" {n} x", f"0{n:x}h"]:
        raw = request("POST", "/v1/chat/completions", port, body=body, headers={"Content-Length": value})
        st, _, b, _ = exchange(port, raw)
        check(st == 400 and b"malformed header" in b, f"strict framing: Content-Length '{value}' -> 400",
              f"{st} {b[:100]!r}")
    raw = request("POST", "/v1/chat/completions", port, body=b"{}",
                  headers={"Transfer-Encoding": "chunked"})
    st, _, _, _ = exchange(port, raw)
    check(st == 400, "Content-Length with Transfer-Encoding -> 400", str(st))
    raw = request("POST", "/v1/chat/completions", port, headers={"Transfer-Encoding": "gzip"})
    raw = raw.replace(b"\r\n\r\n", b"\r\nContent-Type: application/json\r\n\r\n")
    st, _, _, _ = exchange(port, raw)
    check(st == 501, "Transfer-Encoding: gzip -> 501", str(st))
    st, _, _, _ = exchange(port, b"GET /health HTTP/1.1\r\n\r\n")
    check(st == 400, "HTTP/1.1 without Host -> 400", str(st))


def test_browser(port):
    st, _, b, _ = exchange(port, request("GET", "/v1/models", port, headers={"Host": "evil.example:8000"}))
    check(st == 403 and b"Host" in b, "Host evil.example (DNS rebinding): 403", f"{st} {b[:120]!r}")
    st, _, _, _ = exchange(port, request("GET", "/v1/models", port, headers={"Host": f"localhost:{port}"}))
    check(st == 200, "Host localhost:PORT: 200", str(st))
    st, _, b, _ = exchange(port, request("POST", "/v1/chat/completions", port, body=chat_body("hi"),
                                         ctype="text/plain"))
    check(st == 415, "POST with Content-Type text/plain: 415", f"{st} {b[:100]!r}")
    st, _, b, _ = exchange(port, request("POST", "/v1/chat/completions", port, body=chat_body("unicode"),
                                         headers={"Origin": "http://evil.test"}))
    check(st == 403 and b"cross-origin" in b, "Origin not --cors: 403", f"{st} {b[:100]!r}")
    st, _, _, _ = exchange(port, request("POST", "/v1/chat/completions", port, body=chat_body("unicode"),
                                         headers={"Origin": "http://allowed.test"}))
    check(st == 200, "Origin = --cors: 200", str(st))
    st, _, _, _ = exchange(port, request("GET", "/health", port, key=None, headers={"Host": "evil.example"}))
    check(st == 200, "/health answers whatever the Host", str(st))


def test_half_close(port):
    for stream in (False, True):
        s = connect(port)
        s.sendall(request("POST", "/v1/chat/completions", port, body=chat_body("unicode please", stream=stream)))
        s.shutdown(socket.SHUT_WR)
        try:
            st, h, b, _ = read_response(s)
        except (EOFError, ConnectionError) as exc:
            st, b = 0, repr(exc).encode()
        want = b"[DONE]" if stream else b"llo"
        check(st == 200 and want in b, f"half-closed client ({'stream' if stream else 'whole'}) gets its reply",
              f"{st} {b[:120]!r}")
        s.close()


def test_types_and_duplicates(port):
    cases = [
        ("stream_options", {"stream_options": "yes"}),
        ("tool_choice", {"tool_choice": 5}),
        ("tools", {"tools": {"type": "function"}}),
        ("tools[0].function.parameters", {"tools": [{"type": "function", "function": {"name": "f",
                                                                                   "parameters": "x"}}]}),
    ]
    for field, extra in cases:
        st, _, b, _ = exchange(port, request("POST", "/v1/chat/completions", port, body=chat_body("hi", **extra)))
        check(st == 400 and field.encode() in b, f"'{field}' of the wrong type: 400 naming it", f"{st} {b[:150]!r}")
    body = b'{"model":"deepseek-chat","stream":"not a bool","stream":false,' \
           b'"messages":[{"role":"user","content":"unicode please"}]}'
    st, _, b, _ = exchange(port, request("POST", "/v1/chat/completions", port, body=body))
    check(st == 200, "duplicate keys: the last one wins (as in Python and JS)", f"{st} {b[:150]!r}")
    st, _, b, _ = exchange(port, request("POST", "/v1/responses", port,
                                         body=b'{"input":"hi","reasoning":"high"}'))
    check(st == 400 and b"reasoning" in b, "Responses 'reasoning' must be an object", f"{st} {b[:150]!r}")


def test_metrics(port):
    exchange(port, request("POST", "/v1/chat/completions", port, body=chat_body("unicode please")))
    st, h, b, _ = exchange(port, request("GET", "/metrics", port))
    text = b.decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, v = line.rsplit(" ", 1)
            values[name] = float(v)
    need = ["ds4_http_requests_total", "ds4_generations_total", "ds4_prompt_tokens_total",
            "ds4_generated_tokens_total", "ds4_cache_hits_total", "ds4_decode_tokens_per_second",
            "ds4_prefill_tokens_per_second", "ds4_queue_length", 'ds4_http_responses_total{class="2xx"}']
    missing = [n for n in need if n not in values]
    check(st == 200 and h.get("content-type", "").startswith("text/plain") and not missing
          and values["ds4_generations_total"] >= 1 and values["ds4_generated_tokens_total"] > 0,
          "/metrics: Prometheus text with requests, tokens, tok/s, cache hits, queue",
          f"{st} missing={missing}")
    st, _, _, _ = exchange(port, request("GET", "/metrics", port, key=None))
    check(st == 401, "/metrics needs the key like /v1/models", str(st))


def test_queue_notes(port):
    results = {}

    def long_one():
        results["first"] = exchange(port, request("POST", "/v1/chat/completions", port,
                                                  body=chat_body("long reply please", max_tokens=600)), timeout=60)

    t = threading.Thread(target=long_one)
    t.start()
    time.sleep(0.3)
    s = connect(port, 60)
    s.sendall(request("POST", "/v1/chat/completions", port, body=chat_body("unicode please", stream=True)))
    buf = b""
    t0 = time.time()
    while b": queued" not in buf and time.time() - t0 < 5:
        data = s.recv(4096)
        if not data:
            break
        buf += data
    note = buf[buf.find(b": queued"):].split(b"\n")[0] if b": queued" in buf else b""
    st, _, b, _ = read_response(s, buf)
    t.join(60)
    check(b": queued, 1 request ahead" in b and b"[DONE]" in b,
          "a stream waiting behind another gets ': queued, N ahead' SSE comments", f"{note!r} {b[:120]!r}")
    s.close()


def test_slots(binary):
    srv = Server(binary, "--max-conns", "8", "--header-timeout", "30", "--api-key", KEY)
    socks = []
    try:
        for _ in range(8):
            s = connect(srv.port)
            s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")      # and never more
            socks.append(s)
        time.sleep(1.3)
        t0 = time.time()
        st, _, _, _ = exchange(srv.port, request("GET", "/health", srv.port, key=None), timeout=5)
        dt = time.time() - t0
        st2, _, _, _ = exchange(srv.port, request("GET", "/v1/models", srv.port), timeout=5)
        check(st == 200 and dt < 2 and st2 == 200,
              "8 trickling clients hold --max-conns 8: /health and a real request still answered",
              f"health {st} in {dt:.2f}s, models {st2}")
        closed = sum(is_closed(s, 0.5) for s in socks)
        check(closed >= 1, "the slowest trickling connections were reclaimed", f"{closed} of 8 closed")
    finally:
        for s in socks:
            s.close()
        srv.stop()


def test_keys(binary):
    long_key = "k" * 3000
    srv = Server(binary, "--api-key", long_key)
    try:
        st, _, _, _ = exchange(srv.port, request("GET", "/v1/models", srv.port, key=long_key))
        st2, _, _, _ = exchange(srv.port, request("GET", "/v1/models", srv.port, key=long_key[:-1] + "x"))
        st3, _, _, _ = exchange(srv.port, request("GET", "/v1/models", srv.port, key=None,
                                                  headers={"x-api-key": long_key}))
        check(st == 200 and st2 == 401 and st3 == 200, "a 3000-byte API key matches (and a wrong one does not)",
              f"{st} {st2} {st3}")
    finally:
        srv.stop()
    r = subprocess.run([binary, "--server", "-m", MODEL, "--port", "0", "--api-key", ""],
                       capture_output=True, text=True, timeout=20)
    check(r.returncode != 0 and "--api-key is empty" in r.stderr, "--api-key '' refused at start-up",
          r.stderr[-200:])
    r = subprocess.run([binary, "--server", "-m", MODEL, "--host", "192.0.2.1", "--port", "0"],
                       capture_output=True, text=True, timeout=60)
    check("WARNING" in r.stderr and "no --api-key" in r.stderr,
          "beyond loopback without a key: a loud warning", r.stderr[-200:])


def zeros_body(mb):
    n = mb * 1024 * 1024 // 2
    return b"[" + b"0," * (n - 1) + b"0]"


def measure(binary):
    """VmHWM of the server before and after one 8 MB [0,0,...] body (kB)."""
    srv = Server(binary, "--max-body", str(16 << 20))
    try:
        exchange(srv.port, request("GET", "/health", srv.port, key=None))
        before = srv.vmhwm_kb()
        st, _, b, _ = exchange(srv.port, request("POST", "/v1/chat/completions", srv.port,
                                                 body=zeros_body(8), key=None), timeout=60)
        after = srv.vmhwm_kb()
        return before, after, st, b[:160]
    finally:
        srv.stop()


def test_memory(binary):
    before, after, st, b = measure(binary)
    grew = (after - before) / 1024
    print(f"     VmHWM {before / 1024:.0f} MB -> {after / 1024:.0f} MB (+{grew:.0f} MB) for the 8 MB body")
    check(st == 413 and grew < 150, "8 MB [0,0,...]: 413 within the parse budget, peak RSS grows < 150 MB",
          f"{st} +{grew:.0f} MB {b!r}")


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "--measure":
        before, after, st, b = measure(sys.argv[2])
        print(f"{sys.argv[2]}: status {st}, VmHWM {before} kB -> {after} kB (+{(after - before) / 1024:.0f} MB)")
        return 0
    binary = sys.argv[1] if len(sys.argv) > 1 else "./ds4"
    script = [{"match": "long reply", "reply": "word " * 300}, {"match": "unicode", "reply": "h\u00e9llo w\u00f6rld"}]
    srv = Server(binary, "--api-key", KEY, "--cors", "http://allowed.test", "--max-body", "1048576",
                 "--header-timeout", "3", "--body-timeout", "3", script=script)
    if srv.port is None:
        print(srv.stderr())
        print("0 passed, 1 failed")
        return 1
    print(f"server on 127.0.0.1:{srv.port}")
    try:
        for t in (test_keep_alive, test_head, test_chunked, test_framing, test_browser, test_half_close,
                  test_types_and_duplicates, test_metrics, test_queue_notes):
            try:
                t(srv.port)
            except Exception as exc:            # a hang or a protocol error is a failure, not a crash
                check(False, t.__name__, repr(exc))
        st, _, _, _ = exchange(srv.port, request("GET", "/health", srv.port, key=None))
        check(srv.proc.poll() is None and st == 200, "the server is still healthy")
    finally:
        srv.stop()
    for t in (test_keep_alive_limits, test_slots, test_keys, test_memory):
        try:
            t(binary)
        except Exception as exc:
            check(False, t.__name__, repr(exc))
    print(f"\n{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
