#!/usr/bin/env python3
"""Behaviour figures of a trained tiny model, measured through ds4 itself.

    python3 tools/eval_tiny.py --model M.gguf [--mtp M-mtp.gguf] --data DIR [--port 18181]
                               [--requests 50] [--out figures.json]

  * tool calls: the first --requests held-out requests of DIR/tool_eval.jsonl (tool sets,
    phrasings and argument values not in training) go to `ds4 --server` as OpenAI chat
    completions with their tools, greedy. A request counts as right when the reply has a
    well-formed `tool_calls` entry naming the expected tool whose JSON arguments validate
    against that tool's schema (required keys present, no unknown keys, types and enums
    right). The same requests then go to /v1/messages (Anthropic): right when the first
    tool_use block names the tool and its input validates.
  * words: `ds4 -p PROMPT -n 64 --nothink` at temperature 0 for a few prompts; the share of
    the output's words that occur in the training text (DIR/train_words.txt).
Standard library only. The server binds 127.0.0.1 on --port and is stopped at the end.
"""
import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

PROMPTS = ["Write a Python function that reverses a string", "What is in notes.txt?",
           "Tell me about os.path.join.", "How do I write a function that sorts a list of strings in Python?"]


def post(port, path, body, timeout=120):
    req = urllib.request.Request("http://127.0.0.1:%d%s" % (port, path), data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def valid_args(args, schema):
    props, req = schema.get("properties", {}), schema.get("required", [])
    if not isinstance(args, dict) or any(k not in args for k in req) or any(k not in props for k in args):
        return False
    types = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "object": dict,
             "array": list}
    for k, v in args.items():
        p = props[k]
        if "type" in p and not isinstance(v, types.get(p["type"], object)):
            return False
        if "enum" in p and v not in p["enum"]:
            return False
    return True


def tool_figures(port, reqs):
    right, formed, rows = 0, 0, []
    for ev in reqs:
        body = {"model": "deepseek-v4-flash" if ev.get("think") else "deepseek-chat", "messages": ev["messages"],
                "tools": ev["tools"], "temperature": 0, "max_tokens": 160}
        try:
            msg = post(port, "/v1/chat/completions", body)["choices"][0]["message"]
        except Exception as e:  # a failed request counts as wrong, with its reason
            rows.append({"user": ev["user"], "error": str(e)})
            continue
        calls = msg.get("tool_calls") or []
        ok = False
        if calls:
            formed += 1
            fn = calls[0].get("function", {})
            schema = next((t["function"]["parameters"] for t in ev["tools"]
                           if t["function"]["name"] == fn.get("name")), None)
            try:
                args = json.loads(fn.get("arguments", ""))
            except ValueError:
                args = None
            ok = fn.get("name") == ev["tool"] and schema is not None and valid_args(args, schema)
        right += ok
        rows.append({"user": ev["user"], "want": ev["tool"], "got": calls[:1] or msg.get("content", "")[:120],
                     "ok": ok})
    return {"requests": len(reqs), "with_tool_calls": formed, "right": right,
            "accuracy": right / max(1, len(reqs)), "details": rows}


def anthropic_body(ev):
    """The request as an Anthropic Messages body: system text on top, tools with input_schema."""
    system = "\n\n".join(m["content"] for m in ev["messages"] if m["role"] == "system")
    body = {"model": "deepseek-v4-flash" if ev.get("think") else "deepseek-chat", "max_tokens": 160,
            "temperature": 0, "messages": [m for m in ev["messages"] if m["role"] != "system"],
            "tools": [{"name": t["function"]["name"], "description": t["function"].get("description", ""),
                       "input_schema": t["function"]["parameters"]} for t in ev["tools"]]}
    if system:
        body["system"] = system
    return body


def anthropic_figures(port, reqs):
    """Right: the reply's first tool_use block names the expected tool, its input validates."""
    right, formed, rows = 0, 0, []
    for ev in reqs:
        try:
            content = post(port, "/v1/messages", anthropic_body(ev))["content"]
        except Exception as e:
            rows.append({"user": ev["user"], "error": str(e)})
            continue
        uses = [b for b in content if b.get("type") == "tool_use"]
        ok = False
        if uses:
            formed += 1
            schema = next((t["function"]["parameters"] for t in ev["tools"]
                           if t["function"]["name"] == uses[0].get("name")), None)
            ok = uses[0].get("name") == ev["tool"] and schema is not None and \
                valid_args(uses[0].get("input"), schema)
        right += ok
        rows.append({"user": ev["user"], "want": ev["tool"], "got": uses[:1], "ok": ok})
    return {"requests": len(reqs), "with_tool_use": formed, "right": right,
            "accuracy": right / max(1, len(reqs)), "details": rows}


def word_figures(ds4, model, reference_text):
    vocab = set(re.findall(r"[A-Za-z_]+", reference_text))
    out = []
    for p in PROMPTS:
        r = subprocess.run([ds4, "-m", model, "-p", p, "-n", "64", "--nothink"], capture_output=True, text=True,
                           timeout=600)
        words = re.findall(r"[A-Za-z_]+", r.stdout)
        known = sum(w in vocab for w in words)
        out.append({"prompt": p, "output": r.stdout, "words": len(words),
                    "known_share": known / max(1, len(words))})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ds4", default="./ds4")
    ap.add_argument("--model", required=True)
    ap.add_argument("--mtp")
    ap.add_argument("--data", required=True)
    ap.add_argument("--port", type=int, default=18181)
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--out")
    a = ap.parse_args()
    reqs = [json.loads(l) for l in open(os.path.join(a.data, "tool_eval.jsonl"))][:a.requests]
    ref = open(os.path.join(a.data, "train_words.txt")).read()
    cmd = [a.ds4, "--server", "-m", a.model, "--port", str(a.port), "--ctx", "4096"]
    if a.mtp:
        cmd += ["--mtp", a.mtp]
    srv = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen("http://127.0.0.1:%d/health" % a.port, timeout=2)
                break
            except Exception:
                if srv.poll() is not None:
                    sys.exit("ds4 --server exited: " + srv.stderr.read().decode()[-500:])
                time.sleep(0.2)
        tools = tool_figures(a.port, reqs)
        anthropic = anthropic_figures(a.port, reqs)
    finally:
        srv.send_signal(signal.SIGTERM)
        try:
            srv.wait(timeout=30)
        except subprocess.TimeoutExpired:
            srv.kill()
    words = word_figures(a.ds4, a.model, ref)
    fig = {"tool_calls": tools, "anthropic_tool_use": anthropic, "greedy_words": words}
    print("tool calls: %d/%d right (%.0f%%), %d replies had tool_calls" % (
        tools["right"], tools["requests"], 100 * tools["accuracy"], tools["with_tool_calls"]))
    print("anthropic tool_use: %d/%d right (%.0f%%), %d replies had a tool_use block" % (
        anthropic["right"], anthropic["requests"], 100 * anthropic["accuracy"], anthropic["with_tool_use"]))
    for w in words:
        print("greedy %r: %d words, %.0f%% in the training text" % (w["prompt"], w["words"], 100 * w["known_share"]))
    if a.out:
        with open(a.out + ".tmp", "w") as f:
            json.dump(fig, f, indent=1)
        os.replace(a.out + ".tmp", a.out)


if __name__ == "__main__":
    main()
