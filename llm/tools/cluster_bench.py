#!/usr/bin/env python3
"""Measures a cleave-llm cluster of processes: per-token time split, bytes, peak memory.

For each configuration it starts N-1 `cleave-llm worker` processes on loopback, optionally
puts a `cleave-bench link` emulator (delay and rate cap, both directions) in front of each,
runs `cleave-llm master --prompt ... --stats` against them, and reads:

- from the master's `--stats` JSON: per position (prompt and generated tokens alike), the
  master's compute, its time blocked waiting for the workers' partials, the rest of its
  all-reduce time (summing, encoding, sending), sending the step, and the bytes it moved;
  each worker's compute and waiting;
- from the kernel (`wait4`'s `ru_maxrss`): every process's peak resident memory.

Workers get a fresh shard cache per configuration but are warmed once (a one-token run),
so the shard transfer is not in the figures. Every process gets `--threads` compute
threads; on a machine with fewer cores than nodes × threads they share the cores, which
shows up as compute time (say so when you quote the figures).

Prints one Markdown table row per configuration, and writes all figures as JSON with
--json. Standard library only.

    python3 llm/tools/cluster_bench.py --model SmolLM2-135M-Instruct.Q4_1.gguf \\
        --nodes 1,2,3,4 --links none,1ms:100000,5ms:20000 --encodings f64,q8_0
"""

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the GGUF file")
    p.add_argument("--bin", default="target/release/cleave-llm", help="cleave-llm binary")
    p.add_argument("--link-bin", default="target/release/cleave-bench",
                   help="cleave-bench binary (for the link emulator)")
    p.add_argument("--nodes", default="1,2,3,4", help="cluster sizes, comma-separated")
    p.add_argument("--links", default="none",
                   help="links, comma-separated: none (loopback) or DELAY_MS ms:KBIT_PER_S, "
                        "e.g. 1ms:100000 (1 ms one way, 100 Mbit/s each direction)")
    p.add_argument("--encodings", default="f64", help="all-reduce payloads: f64,f32,q8_0")
    p.add_argument("--windows", default="0", help="--memory-window values (0: all layers)")
    p.add_argument("--prompt", default="Once upon a time, in a small village,")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="compute threads per process")
    p.add_argument("--json", help="also write every figure to this file")
    return p.parse_args()


def first_line_matching(stream, pattern, what, timeout=60):
    """Reads lines of `stream` until one matches `pattern`; returns the match."""
    deadline = time.time() + timeout
    seen = []
    while time.time() < deadline:
        line = stream.readline()
        if not line:
            break
        seen.append(line)
        m = re.search(pattern, line)
        if m:
            return m
    sys.exit(f"{what} did not start: {''.join(seen)[-2000:]}")


def reap(proc):
    """Stops `proc` and returns its peak resident memory in bytes."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    _, _, usage = os.wait4(proc.pid, 0)
    return usage.ru_maxrss * 1024


def parse_link(text):
    if text == "none":
        return None
    m = re.fullmatch(r"(\d+)ms:(\d+)", text)
    if not m:
        sys.exit(f"bad link {text!r}: expected none or DELAY_MSms:KBIT_PER_S")
    return int(m.group(1)), int(m.group(2))


def run_master(args, addresses, encoding, window, max_tokens):
    cmd = [args.bin, "master", "--model", args.model, "--threads", str(args.threads),
           "--all-reduce", encoding, "--memory-window", str(window), "--context", "256",
           "--prompt", args.prompt, "--max-tokens", str(max_tokens), "--stats"]
    if addresses:
        cmd += ["--workers", ",".join(addresses)]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    if status != 0:
        sys.exit(f"master failed ({' '.join(cmd)}):\n{err[-3000:]}")
    stats = None
    for line in err.splitlines():
        if line.startswith("{"):
            stats = json.loads(line)
    if stats is None:
        sys.exit(f"the master printed no statistics:\n{err[-3000:]}")
    return stats, usage.ru_maxrss * 1024, wall, out.strip()


def measure(args, nodes, link, encoding, window, scratch):
    procs, addresses, links = [], [], []
    try:
        for i in range(nodes - 1):
            cache = os.path.join(scratch, f"w{i}")
            w = subprocess.Popen(
                [args.bin, "worker", "--listen", "127.0.0.1:0", "--cache-dir", cache,
                 "--threads", str(args.threads)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            procs.append(w)
            m = first_line_matching(w.stderr, r"listening on (\S+)", "worker")
            address = m.group(1)
            if link is not None:
                delay, kbit = link
                proxy = subprocess.Popen(
                    [args.link_bin, "link", "--listen", "127.0.0.1:0", "--to", address,
                     "--delay-ms", str(delay), "--up-kbit", str(kbit), "--down-kbit", str(kbit)],
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                links.append(proxy)
                address = first_line_matching(proxy.stdout, r"link on (\S+)", "link").group(1)
            addresses.append(address)
        # Warm-up: the shards travel and are cached; the page cache holds the model.
        run_master(args, addresses, encoding, window, 1)
        stats, master_rss, wall, answer = run_master(
            args, addresses, encoding, window, args.max_tokens)
    finally:
        for p in links:
            reap(p)
        worker_rss = [reap(w) for w in procs]
    return {
        "nodes": nodes,
        "link": "loopback" if link is None else f"{link[0]} ms, {link[1] / 1000:g} Mbit/s",
        "encoding": encoding,
        "window": window,
        "stats": stats,
        "master_peak_rss": master_rss,
        "worker_peak_rss": worker_rss,
        "wall_s": wall,
        "answer": answer,
    }


def row(r):
    s = r["stats"]
    m = s["master"]
    reduce_rest = m["all_reduce_ms_per_token"] - m["waiting_ms_per_token"]
    total = (m["compute_ms_per_token"] + m["all_reduce_ms_per_token"]
             + m["step_send_ms_per_token"])
    workers = s["workers"]
    worker_compute = max((w["compute_ms_per_token"] for w in workers), default=0.0)
    mib = lambda b: f"{b / 2**20:.0f}"
    worker_rss = "/".join(mib(b) for b in r["worker_peak_rss"]) or "—"
    return (f"| {r['nodes']} | {r['link']} | {r['encoding']} | {r['window'] or 'all'} "
            f"| {total:.1f} | {m['compute_ms_per_token']:.1f} | {m['waiting_ms_per_token']:.1f} "
            f"| {reduce_rest + m['step_send_ms_per_token']:.1f} | {worker_compute:.1f} "
            f"| {m['bytes_per_token'] / 1024:.1f} | {mib(r['master_peak_rss'])} | {worker_rss} |")


def main():
    args = parse_args()
    for path in (args.bin, args.model):
        if not os.path.exists(path):
            sys.exit(f"{path} does not exist (build with cargo build --release -p cleave-llm)")
    links = [parse_link(t) for t in args.links.split(",")]
    if any(links) and not os.path.exists(args.link_bin):
        sys.exit(f"{args.link_bin} does not exist (cargo build --release -p cleave-bench)")
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"machine: {cpu}, {os.cpu_count()} cores; {args.threads} compute thread(s) per "
          f"process; prompt {args.prompt!r}, {args.max_tokens} tokens; per position (ms)")
    print("| nodes | link | all-reduce | window | total | master compute | waiting for "
          "workers | reduce + send | slowest worker compute | KiB/token | master MiB "
          "| worker MiB |")
    print("|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for link in links:
            for nodes in [int(n) for n in args.nodes.split(",")]:
                for encoding in args.encodings.split(","):
                    for window in [int(w) for w in args.windows.split(",")]:
                        if nodes == 1 and (link is not None or encoding != "f64"):
                            continue  # nothing travels
                        run_dir = tempfile.mkdtemp(dir=scratch)
                        r = measure(args, nodes, link, encoding, window, run_dir)
                        results.append(r)
                        print(row(r), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": cpu, "cores": os.cpu_count(), "args": vars(args),
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
