#!/usr/bin/env python3
"""Gateway CPU and context switches per call for a client alternating between connections.

Starts `gatehouse example-server --http` and a gateway in front of it, then sends sequential
small `tools/call`s, as session calls and as 2026-07-28 stateless ones, in alternating batches,
each call on the next of CONNECTIONS keep-alive connections (two connections are served by two
gateway threads). Reads the gateway's CPU time and context switches from /proc around each
batch. Standard library only.

    cargo build --release
    python3 benches/alternating_client.py [--binary target/release/gatehouse]
        [--calls 2000] [--rounds 3] [--connections 2]
"""
import argparse, glob, http.client, json, os, socket, subprocess, tempfile, time


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def cpu_ticks(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def switches(pid):
    voluntary = involuntary = 0
    for task in glob.glob(f"/proc/{pid}/task/*/status"):
        for line in open(task):
            if line.startswith("voluntary_ctxt_switches"):
                voluntary += int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches"):
                involuntary += int(line.split()[1])
    return voluntary, involuntary


def wait_for(port):
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default="target/release/gatehouse")
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=2)
    a = ap.parse_args()
    up, gp = free_port(), free_port()
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = subprocess.Popen([a.binary, "example-server", "--http", f"127.0.0.1:{up}"], **quiet)
    config = os.path.join(tempfile.mkdtemp(), "gatehouse.yaml")
    with open(config, "w") as f:
        f.write(f'listen: 127.0.0.1:{gp}\nlog: {{ level: warn }}\nupstreams:\n'
                f'  - name: u0\n    http: {{ url: "http://127.0.0.1:{up}/mcp" }}\n')
    gateway = subprocess.Popen([a.binary, "serve", "--config", config], **quiet)
    try:
        wait_for(up)
        wait_for(gp)
        conns = [http.client.HTTPConnection("127.0.0.1", gp) for _ in range(a.connections)]
        sent = [0]
        base = {"content-type": "application/json", "accept": "application/json, text/event-stream"}

        def post(body, headers):
            c = conns[sent[0] % len(conns)]
            sent[0] += 1
            c.request("POST", "/mcp", body=json.dumps(body), headers={**base, **headers})
            r = c.getresponse()
            data = r.read()
            if r.status not in (200, 202):
                raise SystemExit(f"HTTP {r.status}: {data[:200]!r}")
            return r

        r = post({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {},
            "clientInfo": {"name": "alternating", "version": "1"}}}, {})
        sid = r.getheader("mcp-session-id")
        post({"jsonrpc": "2.0", "method": "notifications/initialized"}, {"mcp-session-id": sid})
        args = {"name": "u0__echo", "arguments": {"text": "hello"}}
        kinds = {
            "session": ({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": args},
                        {"mcp-session-id": sid, "mcp-protocol-version": "2025-11-25"}),
            "stateless": ({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {**args, "_meta": {
                "io.modelcontextprotocol/protocolVersion": "2026-07-28",
                "io.modelcontextprotocol/clientCapabilities": {}}}},
                {"mcp-protocol-version": "2026-07-28", "mcp-method": "tools/call",
                 "mcp-name": "u0__echo"}),
        }
        for body, headers in kinds.values():  # warm-up: connections opened, sessions made
            for _ in range(2 * a.connections):
                post(body, headers)
        tick = os.sysconf("SC_CLK_TCK")
        print("| calls | round | gateway CPU µs/call | voluntary switches/call | involuntary/call |")
        print("|---|---:|---:|---:|---:|")
        for rnd in range(a.rounds):
            for kind, (body, headers) in kinds.items():
                c0, s0 = cpu_ticks(gateway.pid), switches(gateway.pid)
                for _ in range(a.calls):
                    post(body, headers)
                c1, s1 = cpu_ticks(gateway.pid), switches(gateway.pid)
                print(f"| {kind} | {rnd} | {(c1 - c0) / tick / a.calls * 1e6:.0f} | "
                      f"{(s1[0] - s0[0]) / a.calls:.2f} | {(s1[1] - s0[1]) / a.calls:.2f} |")
    finally:
        gateway.terminate()
        server.terminate()


if __name__ == "__main__":
    main()
