"""A stdio relay that records the JSON-RPC traffic between the gateway and a stdio MCP server.

    python tap.py LOGDIR NAME -- COMMAND [ARGS...]

The gateway starts this instead of the server; it starts COMMAND, copies the gateway's stdin
to it and its stdout back, and appends every line to LOGDIR/NAME-<pid>.jsonl as
{"t": <time>, "dir": "in" (gateway -> server) | "out" (server -> gateway), "msg": <message>},
and last {"dir": "exit", "msg": {"exit": <status>}} when the server has exited.
The tests read those logs to see what the upstream was really sent (e.g. notifications/cancelled).
When the server exits, the relay exits with its status, so a crash looks the same to the gateway.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time


def main() -> int:
    argv = sys.argv[1:]
    if len(argv) < 4 or argv[2] != "--":
        print("usage: tap.py LOGDIR NAME -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    logdir, name, command = argv[0], argv[1], argv[3:]
    os.makedirs(logdir, exist_ok=True)
    log = open(os.path.join(logdir, f"{name}-{os.getpid()}.jsonl"), "a", encoding="utf-8")
    lock = threading.Lock()

    def record(direction: str, line: bytes) -> None:
        text = line.decode("utf-8", "replace").strip()
        if not text:
            return
        try:
            msg = json.loads(text)
        except ValueError:
            msg = {"unparsed": text}
        with lock:
            log.write(json.dumps({"t": time.time(), "dir": direction, "msg": msg}) + "\n")
            log.flush()

    child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def on_term(signum: int, _frame: object) -> None:
        child.send_signal(signum)
        try:
            child.wait(timeout=2)
        except subprocess.TimeoutExpired:
            child.kill()
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)

    def pump_in() -> None:
        assert child.stdin is not None
        try:
            for line in sys.stdin.buffer:
                record("in", line)
                child.stdin.write(line)
                child.stdin.flush()
        except (BrokenPipeError, OSError):
            pass
        finally:
            try:
                child.stdin.close()
            except OSError:
                pass

    threading.Thread(target=pump_in, daemon=True).start()
    assert child.stdout is not None
    out = sys.stdout.buffer
    try:
        for line in child.stdout:
            record("out", line)
            out.write(line)
            out.flush()
    except (BrokenPipeError, OSError):
        child.kill()
    code = child.wait()
    record("exit", json.dumps({"exit": code}).encode())
    log.close()
    # Do not wait for the stdin thread: it may be blocked reading from the gateway.
    os._exit(code if code >= 0 else 128 - code)


if __name__ == "__main__":
    sys.exit(main())
