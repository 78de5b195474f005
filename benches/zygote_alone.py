#!/usr/bin/env python3
"""The python zygote on its own: drives `src/daemon/pool/zygote.py` over its socket the way the
daemon does (one job at a time, Nomad-sized environment, the isolation steps of a session with
`env io net`, no cgroup), without daemon, plugin or gRPC. Prints the CPU the zygote and its
children spend per job, the pages they make private (copy-on-write and first-touch faults), and
where a job's wall time goes. With --idle N, instead: the memory of N idle snippets
(`time.sleep`), the zygote and its spares' PSS summed / N, and a child's private dirty memory.

    make bench-zygote            # or: python3 benches/zygote_alone.py [--jobs N] [--pace-ms MS] [--spares N] [--no-domain] [--no-caps] [--idle N]

The split, per job (medians):
  send -> ready      job sent until the child reported itself isolated (what StartExecution waits for)
  ready -> noted     the snippet runs and the child notes its exit code in the shared exit-note
                     page (what WaitExecution waits for, with notes; see exit_notes.rs)
  noted -> exited    the child's exit: its address space torn down, until its pidfd turns readable
  ready -> exited    the two above together
  exited -> report   until the zygote's exit message arrives (what WaitExecution waits for
                     without notes)
"""
import argparse
import ctypes
import json
import mmap
import os
import select
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZYGOTE = os.path.join(ROOT, "src", "daemon", "pool", "zygote.py")
# Slots of the exit-note region (exit_notes.rs's SLOTS: 8 banks of 127).
NOTE_SLOTS = 8 * 127


def stat_counters(pid):
    """(minflt, cminflt, CPU ticks) of `pid`: the zygote reaps its children, so the c-fields
    and the ticks (utime stime cutime cstime) include theirs."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[7]), int(fields[8]), sum(int(x) for x in fields[11:15])


def rollup(pid, field):
    """A field of /proc/<pid>/smaps_rollup, in kB (0 for a process gone meanwhile)."""
    try:
        with open("/proc/%d/smaps_rollup" % pid) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def capability_step():
    """The daemon's `limit_capabilities` step (`src/sandbox/caps.rs`): Nomad's `exec` default set,
    the rest dropped from the bounding set too where this process may (CAP_SETPCAP)."""
    kept = sum(1 << c for c in (0, 1, 3, 4, 5, 6, 7, 8, 10, 18, 27, 29, 31))
    status = dict(l.split(":", 1) for l in open("/proc/self/status") if l.startswith("Cap"))
    eff, bnd = int(status["CapEff"], 16), int(status["CapBnd"], 16)
    bounding = [c for c in range(64) if bnd & ~kept & (1 << c)] if eff & (1 << 8) else []
    return {"step": "limit_capabilities", "keep": kept, "bounding": bounding}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", default=shutil.which("python3"), help="interpreter (resolved to its real path)")
    ap.add_argument("--jobs", type=int, default=300)
    ap.add_argument("--pace-ms", type=float, default=0, help="pause between jobs")
    ap.add_argument("--spares", type=int, default=4, help="children kept forked (context_pool_size)")
    ap.add_argument("--no-domain", action="store_true", help="skip the Landlock domain step (to measure its cost)")
    ap.add_argument("--no-caps", action="store_true", help="skip the capability step (to measure its cost)")
    ap.add_argument("--idle", type=int, default=0, metavar="N", help="measure N idle snippets' memory instead")
    args = ap.parse_args()
    if args.idle < 0 or args.jobs < 1:
        ap.error("--jobs must be at least 1 and --idle not negative, got --jobs %d --idle %d" % (args.jobs, args.idle))
    if args.spares < 1:
        ap.error("--spares must be at least 1 (a zygote without spares runs no job), got %d" % args.spares)
    if not args.python:
        sys.exit("zygote_alone: no python3 on PATH; pass --python")
    python = os.path.realpath(args.python)
    if "pyenv/shims" in args.python:
        python = subprocess.check_output(["pyenv", "which", "python3"], text=True).strip()

    work = tempfile.mkdtemp(prefix="elide-zygote-bench-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    script = os.path.join(work, "main.py")
    with open(script, "w") as f:
        f.write('import time\ntime.sleep(600)\n' if args.idle else 'print("hi")\n')
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with open(ZYGOTE) as f:
        source = f.read()
    caps = capability_step()
    zygote = subprocess.Popen(
        # As the daemon starts it: the capability step its children run, to prepare.
        [python, "-c", source, str(args.spares), json.dumps({"keep": caps["keep"], "bounding": caps["bounding"]})],
        stdin=theirs,
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": work},
        cwd=work,
    )
    theirs.close()
    received = []

    def recv():
        msg, fds, _flags, _addr = socket.recv_fds(ours, 1 << 16, 4)
        received[:] = fds
        return json.loads(msg)

    # The exit-note region, as the daemon shares it (exit_notes.rs): the zygote's first message.
    page = mmap.PAGESIZE
    futex = {"x86_64": 202, "aarch64": 98}.get(os.uname().machine)
    notes_fd = os.memfd_create("elide-exit-notes") if futex else -1
    if futex:
        os.ftruncate(notes_fd, (1 + NOTE_SLOTS) * page)
        region = mmap.mmap(notes_fd, (1 + NOTE_SLOTS) * page)
        setup = {"notes": {"slots": NOTE_SLOTS, "page": page, "futex": futex}}
        socket.send_fds(ours, [json.dumps(setup).encode()], [notes_fd])
        os.close(notes_fd)
    else:
        socket.send_fds(ours, [b'{"notes": null}'], [])
    libc_ = ctypes.CDLL(None, use_errno=True)

    def wait_note(slot):
        """Blocks until the child noted its exit in `slot`; its exit code."""
        at = (1 + slot) * page
        word = ctypes.c_uint32.from_buffer(region, at)
        while word.value == 0:
            libc_.syscall(futex, ctypes.c_void_p(ctypes.addressof(word)), 0, 0, None)
        return word.value & 0xFF

    hello = recv()
    assert "hello" in hello, hello
    time.sleep(1)  # the first spare prepares itself
    null = os.open("/dev/null", os.O_WRONLY)
    env = [["PATH", "/usr/bin:/bin"], ["HOME", work], ["LANG", "C.UTF-8"]]
    env += [["NOMAD_VAR_%d" % i, "value-%d-of-a-nomad-task-environment" % i] for i in range(40)]
    steps = [
        {"step": "chdir", "path": work},
        {"step": "stdio", "stdin": "/dev/null"},
        {"step": "reset_signals"},
        {"step": "new_session"},
        {"step": "set_rlimit", "resource": "core", "soft": 0, "hard": 0},
        {"step": "oom_score_adj", "value": 0},
        {"step": "parent_death_signal"},
    ]
    if not args.no_caps:
        steps.append(caps)
    steps.append({"step": "no_new_privs"})
    # As the daemon does on Linux 6.12+: every execution is a Landlock domain of its own, the
    # ruleset (signals scoped, no filesystem rules) built per job and passed as a third fd.
    libc = ctypes.CDLL(None, use_errno=True)
    scope_signals = struct.pack("=QQQ", 0, 0, 2)
    domains = not args.no_domain and libc.syscall(444, None, 0, 1) >= 6
    if domains:
        steps.append({"step": "landlock_domain"})
    steps.append({"step": "close_fds_from", "from": 3})
    phases = {"send -> ready": [], "ready -> noted": [], "noted -> exited": [], "ready -> exited": [],
              "exited -> report": [], "send -> noted": [], "total": []}

    def send(token):
        job = {"token": token, "steps": steps, "env": env, "argv": [python, script], "script": script}
        if futex:
            slot = token % NOTE_SLOTS
            region[(1 + slot) * page:(1 + slot) * page + 16] = bytes(16)
            job["note"] = {"slot": slot, "nonce": token}
        ruleset = libc.syscall(444, scope_signals, len(scope_signals), 0) if domains else -1
        socket.send_fds(ours, [json.dumps(job).encode()], [null, null] + ([ruleset] if domains else []))
        if domains:
            os.close(ruleset)

    if args.idle:
        idle_memory(args, python, zygote, send, recv, received)
        ours.close()
        zygote.wait()
        shutil.rmtree(work, ignore_errors=True)
        return
    faults0, cfaults0, ticks0 = stat_counters(zygote.pid)
    for token in range(1, args.jobs + 1):
        t0 = time.monotonic_ns()
        send(token)
        pidfd = None
        while True:
            m = recv()
            if "failed" in m:
                sys.exit("zygote_alone: the child failed: %s" % m["failed"])
            if "ready" in m:
                t_ready = time.monotonic_ns()
                pidfd = received[0]
                t_noted = None
                if futex:
                    wait_note(token % NOTE_SLOTS)
                    t_noted = time.monotonic_ns()
                select.select([pidfd], [], [])
                t_exited = time.monotonic_ns()
                os.close(pidfd)
            if "exit" in m:
                t_report = time.monotonic_ns()
                break
        phases["send -> ready"].append(t_ready - t0)
        phases["ready -> exited"].append(t_exited - t_ready)
        if t_noted is not None:
            phases["ready -> noted"].append(t_noted - t_ready)
            phases["noted -> exited"].append(t_exited - t_noted)
            phases["send -> noted"].append(t_noted - t0)
        phases["exited -> report"].append(t_report - t_exited)
        phases["total"].append(t_report - t0)
        if args.pace_ms:
            time.sleep(args.pace_ms / 1e3)
    time.sleep(0.3)  # the last spare's preparation belongs to the jobs too
    faults, cfaults, ticks = stat_counters(zygote.pid)
    faults, cfaults, ticks = faults - faults0, cfaults - cfaults0, ticks - ticks0
    with open("/proc/%d/status" % zygote.pid) as f:
        rss = [l.split(":", 1)[1].strip() for l in f if l.startswith("VmRSS")][0]
    ours.close()
    zygote.wait()
    shutil.rmtree(work, ignore_errors=True)

    hz = os.sysconf("SC_CLK_TCK")
    print("python zygote alone: %s, %d spares, %d jobs%s%s, nproc %d, load %s" % (
        python, args.spares, args.jobs, ", paced %g ms" % args.pace_ms if args.pace_ms else " back to back",
        ", Landlock domain per job" if domains else ", no Landlock domain",
        os.cpu_count(), " ".join("%.2f" % x for x in os.getloadavg())))
    print("zygote RSS %s; CPU of zygote + children per job: %.2f ms" % (rss, ticks / hz * 1e3 / args.jobs))
    # Spares forked for the jobs and not yet reaped are not counted: a few pages off, at most.
    print("pages made private per job: zygote %.0f, children %.0f" % (faults / args.jobs, cfaults / args.jobs))
    for name, v in phases.items():
        if not v:
            continue
        v.sort()
        print("  %-17s median %6.2f ms   p90 %6.2f ms" % (name, statistics.median(v) / 1e6, v[int(len(v) * 0.9)] / 1e6))


def idle_memory(args, python, zygote, send, recv, received):
    """Starts args.idle sleeping snippets, then sums the PSS of the zygote and all its children
    (snippets and spares) / N, next to one child's private dirty memory (median)."""
    pids = []
    for token in range(1, args.idle + 1):
        send(token)
        while True:
            m = recv()
            if "failed" in m:
                sys.exit("zygote_alone: the child failed: %s" % m["failed"])
            if "ready" in m:
                os.close(received[0])
                pids.append(m["pid"])
                break
        time.sleep(0.02)  # the spares refill, as between tasks
    time.sleep(2)
    with open("/proc/%d/task/%d/children" % (zygote.pid, zygote.pid)) as f:
        family = [zygote.pid] + [int(p) for p in f.read().split()]
    pss = sum(rollup(p, "Pss") for p in family)
    private = sorted(rollup(p, "Private_Dirty") for p in pids)
    print("python zygote alone: %s, %d spares, %d idle snippets (time.sleep), nproc %d, load %s" % (
        python, args.spares, args.idle, os.cpu_count(), " ".join("%.2f" % x for x in os.getloadavg())))
    print("PSS of zygote + %d children / %d: %.2f MiB; a snippet's private dirty memory (median): %d kB" % (
        len(family) - 1, args.idle, pss / args.idle / 1024, private[len(private) // 2]))
    # Closing the socket ends the zygote; its children die with it (parent-death signal).


if __name__ == "__main__":
    main()
