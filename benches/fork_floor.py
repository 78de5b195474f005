#!/usr/bin/env python3
"""What the fork-server design costs at the least on this machine and interpreter: the lower
bound under every pooled python figure in BENCHMARKS.md, with no isolation step, environment,
report or stdio work in the child at all.

    make bench-floor     # or: python3 benches/fork_floor.py [--python P] [--rounds N] [--idle N]

A process imports what the zygote imports (`src/daemon/pool/zygote.py`, warmed and frozen as the
zygote does) and then, for each round, forks one child and reaps it:
  bare   the child exits at once (fork, after-fork hooks, exit teardown)
  job    the child receives a Nomad-sized JSON job over a socket pair, decodes it, runs `pass`
         as a fresh `__main__` module, and exits: the least a pooled execution can do
and prints the CPU per round of parent and child together, and the child's minor faults (pages it
made private). Then it forks `--idle` children that take a job and sleep, and sums the PSS of the
parent and the children over their number, next to as many cold interpreters sleeping.
"""
import argparse
import builtins
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POOL = os.path.join(ROOT, "src", "daemon", "pool")
ENV = [["NOMAD_VAR_%d" % i, "value-%d-of-a-nomad-task-environment" % i] for i in range(40)]
JOB = json.dumps({"token": 1, "steps": [], "env": ENV, "argv": ["python3", "/main.py"], "script": "/main.py"}).encode()


def pss_kib(pid):
    with open("/proc/%d/smaps_rollup" % pid) as f:
        return sum(int(l.split()[1]) for l in f if l.startswith("Pss:"))


def take_job(sock):
    job = json.loads(sock.recv(1 << 16))
    main = types.ModuleType("__main__")
    main.__builtins__ = builtins
    exec(compile("pass", job["script"], "exec", dont_inherit=True), main.__dict__)


def rounds(mode, n, ours, theirs):
    r0, c0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            if mode == "job":
                take_job(theirs)
            os._exit(0)
        if mode == "job":
            ours.send(JOB)
        os.waitpid(pid, 0)
    r1, c1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = sum(getattr(b, f) - getattr(a, f) for a, b in ((r0, r1), (c0, c1)) for f in ("ru_utime", "ru_stime"))
    return cpu / n * 1e3, (c1.ru_minflt - c0.ru_minflt) / n


def idle_children(n, ours, theirs):
    pids = []
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            take_job(theirs)
            time.sleep(600)
            os._exit(0)
        ours.send(JOB)
        pids.append(pid)
    time.sleep(1)
    total = pss_kib(os.getpid()) + sum(pss_kib(p) for p in pids)
    for p in pids:
        os.kill(p, 9)
        os.waitpid(p, 0)
    return total / n / 1024


def cold_interpreters(python, n):
    procs = [subprocess.Popen([python, "-c", "import time; time.sleep(600)"]) for _ in range(n)]
    time.sleep(2)
    total = sum(pss_kib(p.pid) for p in procs)
    for p in procs:
        p.kill()
        p.wait()
    return total / n / 1024


def measure(args):
    # Imported from the source tree: no bytecode cache left in it.
    sys.dont_write_bytecode = True
    sys.path.insert(0, POOL)
    import gc
    import zygote  # noqa: F401 (its imports are the point)

    zygote._warm()
    gc.collect()
    gc.freeze()
    gc.disable()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    out = {}
    for mode in ("bare", "job"):
        out[mode] = rounds(mode, args.rounds, ours, theirs)
    if args.idle:
        out["idle"] = idle_children(args.idle, ours, theirs)
    print(json.dumps(out))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", default=shutil.which("python3"), help="interpreter (resolved to its real path)")
    ap.add_argument("--rounds", type=int, default=400)
    ap.add_argument("--idle", type=int, default=50, help="idle children for the memory figure (0: skip)")
    ap.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        return measure(args)
    if args.rounds < 1 or args.idle < 0:
        ap.error("--rounds must be at least 1 and --idle at least 0, got %d and %d" % (args.rounds, args.idle))
    if not args.python:
        sys.exit("fork_floor: no python3 on PATH; pass --python")
    python = os.path.realpath(args.python)
    if "pyenv/shims" in args.python:
        python = subprocess.check_output(["pyenv", "which", "python3"], text=True).strip()
    # The measuring process is the interpreter under test, started as the daemon starts the
    # zygote: a minimal environment.
    got = subprocess.run(
        [python, os.path.abspath(__file__), "--measure", "--rounds", str(args.rounds), "--idle", str(args.idle)],
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        stdout=subprocess.PIPE,
        text=True,
        check=True,
    )
    r = json.loads(got.stdout)
    print("fork-server floor: %s, zygote's module set, %d rounds, nproc %d, load %s" % (
        python, args.rounds, os.cpu_count(), " ".join("%.2f" % x for x in os.getloadavg())))
    for mode in ("bare", "job"):
        cpu, faults = r[mode]
        print("  %-4s  CPU per round (parent + child) %.2f ms, child's minor faults %.0f" % (mode, cpu, faults))
    if args.idle:
        cold = cold_interpreters(python, args.idle)
        print("  idle  PSS per child at N = %d (parent + children) / N %.2f MiB, cold interpreter %.2f MiB: %.0f%%" % (
            args.idle, r["idle"], cold, 100 * r["idle"] / cold))


if __name__ == "__main__":
    main()
