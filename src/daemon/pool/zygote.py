# elide python zygote: a fork server owned by one daemon session.
#
# fd 0 is a SOCK_SEQPACKET socket to the daemon. Every message is one JSON object.
#   daemon -> zygote: {"token", "steps", "env", "argv", "script"} + SCM_RIGHTS [stdout, stderr, (landlock ruleset)]
#   zygote -> daemon: {"hello": pid}, {"exit": pid, "status": wait status},
#                     {"empty": bool} when it has no spare left because forks fail, and back,
#                     {"declined": token} for a job it found queued while empty (never run)
#   child  -> daemon: {"forked": token, "pid"}, then
#                     {"ready": token, "pid"} + SCM_RIGHTS [pidfd]  or  {"failed": token, "error"}
# Before any of it, the daemon sends {"notes": {"slots", "page", "futex"} or null} + SCM_RIGHTS
# [memfd]: the exit-note region (exit_notes.rs). A job with "note": {"slot", "nonce"} has its
# child keep only that slot's page mapped and note its exit code there before it exits.
# The zygote never reads the socket itself: it keeps `spares` pre-forked children blocked on it
# (its one argument, the session's context_pool_size), so forks are paid before jobs arrive and
# a burst finds several ready. The kernel hands each job to one spare, which tells the zygote
# through a pipe (and the zygote forks a replacement), replays the daemon's isolation plan (the
# same steps the cold spawn runs in pre_exec), then runs the script as __main__ and leaves with
# os._exit, never returning into the zygote's loop.
import os, sys, json, signal, socket, select, gc, ctypes, errno, mmap, _signal, _socket

# Modules snippets commonly import: loaded once here, shared copy-on-write by every child.
import io, re, math, time, random, struct, types, builtins, traceback, threading, atexit
import collections, functools, itertools, typing, datetime, pathlib, base64, hashlib
import json.decoder, urllib.parse, string, textwrap, copy, dataclasses, enum, subprocess
import resource, fcntl, tokenize, linecache, codecs, encodings.idna, locale, _locale

_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38
_PR_GET_SECCOMP = 21
_SECCOMP_MODE_FILTER = 2
_PR_SET_MEMORY_MERGE = 67
_CLONE_NEWNET = 0x40000000
_SYS_LANDLOCK_ADD_RULE = 445
_SYS_LANDLOCK_RESTRICT_SELF = 446
_LANDLOCK_RULE_PATH_BENEATH = 1
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_SYS_CLOSE_RANGE = 436
_FORK_RETRY_MS = 100
# A spare that took a job is replaced when a child ends, or this long after at the latest,
# while more than half the pool is still idle (see main's loop).
_REFILL_LATE_MS = 20
_PR_CAPBSET_DROP = 24
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_CAP_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_OWN_FILE = (lambda: None).__code__.co_filename

# Plain ints, not the signal module's enums (see _python_signal_defaults).
_SIGINT, _SIGPIPE, _SIGXFSZ, _SIGKILL, _SIGCHLD = (
    int(s) for s in (signal.SIGINT, signal.SIGPIPE, signal.SIGXFSZ, signal.SIGKILL, signal.SIGCHLD)
)
_RESETTABLE_SIGNALS = tuple(s for s in range(1, signal.NSIG) if s not in (signal.SIGKILL, signal.SIGSTOP))

# A child's own path keeps to C functions where the stdlib wraps one in Python (json.loads,
# socket.send_fds/recv_fds, locale.setlocale, os.environ's encoders, socket.close): every
# Python function a child calls is its function and code objects' pages copied.
_SOL_SOCKET, _SCM_RIGHTS = socket.SOL_SOCKET, socket.SCM_RIGHTS
_FDS_SPACE = socket.CMSG_LEN(8 * 4)
# The largest message from the daemon read whole (MAX_JOB_BYTES in python_zygote.rs, which
# sends none larger).
_MAX_MESSAGE = 1 << 20
_LC_CTYPE = locale.LC_CTYPE
_FS_ENCODING = sys.getfilesystemencoding()
# The C scanner json.loads ends in; the daemon's messages are compact JSON, one value each.
_scan_json = json.decoder.JSONDecoder().scan_once


# The zygote's own environment, which a spare sets again while it waits (see _prepare_spare):
# os.environ's mapping methods are Python functions a spare would copy.
_ZYGOTE_ENV = dict(os.environ)


def _decode(msg):
    """A message from the daemon, decoded as json.loads decodes UTF-8 bytes. Raises ValueError
    (or StopIteration, the scanner's own answer to malformed JSON) on a bad one."""
    return _scan_json(msg.decode("utf-8", "surrogatepass"), 0)[0]


def _recv_with_fds(sock):
    """One message and the fds passed with it (socket.recv_fds without its array module)."""
    msg, ancdata, _flags, _addr = sock.recvmsg(_MAX_MESSAGE, _FDS_SPACE)
    fds = []
    for level, kind, data in ancdata:
        if level == _SOL_SOCKET and kind == _SCM_RIGHTS:
            fds.extend(fd for (fd,) in struct.iter_unpack("i", data[: len(data) - len(data) % 4]))
    return msg, fds


def _tell(sock, data):
    """Sends the daemon one message from the zygote. The daemon shuts the socket when it closes
    the pool; shut between our poll and this send, that is the same hang-up the poll would
    have seen next: end quietly, as then (the children follow by PDEATHSIG)."""
    try:
        sock.send(data)
    except ConnectionError:
        os._exit(0)


def _send_with_fd(sock, data, fd):
    sock.sendmsg([data], [(_SOL_SOCKET, _SCM_RIGHTS, struct.pack("i", fd))])


def _coerce_c_locale(env):
    # PEP 538: an interpreter whose LC_CTYPE would be "C" sets LC_CTYPE=C.UTF-8 in its own
    # environment at start-up; a cold child would show it, so the forked one does too.
    if env.get("LC_ALL"):
        return
    ctype = env.get("LC_CTYPE") or env.get("LANG") or ""
    if ctype in ("", "C", "POSIX") and env.get("PYTHONCOERCECLOCALE") != "0":
        env["LC_CTYPE"] = "C.UTF-8"


def _set_environ(env):
    """Makes `env` the whole environment, of the C library and of os.environ. Cheaper than
    os.environ.clear(), which unsets the variables one popitem() at a time."""
    data = os.environ._data
    data.clear()
    _libc.clearenv()
    # What os.environ's encoders do for the str keys and values a job carries.
    for k, v in env.items():
        kb, vb = k.encode(_FS_ENCODING, "surrogateescape"), v.encode(_FS_ENCODING, "surrogateescape")
        os.putenv(kb, vb)
        data[kb] = vb


class StepError(Exception):
    pass


# The exit-note region as the zygote maps it: (address, page size, slots, futex syscall number,
# the mmap object that owns the mapping); None when the daemon shares none.
_notes = None
# A child's note, once its job has a slot: (the buffer and its address, the offset of its page
# there, nonce, pid, futex syscall number).
_note = None
_NOTED = 0x100
_FUTEX_WAKE = 1
# The note's word and nonce, written by C into the region (no ctypes object made per child).
_NOTE_WORD = struct.Struct("=I")
_NOTE_NONCE = struct.Struct("=Q")
# syscall(2) and munmap(2) taking addresses as plain ints (_libc's take C ints by default).
_libc_addr = ctypes.CDLL(None, use_errno=True)
_syscall_addr = _libc_addr.syscall
_syscall_addr.argtypes = (ctypes.c_long, ctypes.c_size_t, ctypes.c_int, ctypes.c_int)
_munmap = _libc_addr.munmap
_munmap.argtypes = (ctypes.c_size_t, ctypes.c_size_t)


def _map_notes(sock):
    """Reads the daemon's first message, the exit-note region, and maps it for the children."""
    global _notes
    msg, fds = _recv_with_fds(sock)
    try:
        setup = _decode(msg).get("notes") if msg else None
        if setup and fds:
            size = (1 + setup["slots"]) * setup["page"]
            region = mmap.mmap(fds[0], size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            address = ctypes.addressof(ctypes.c_char.from_buffer(region))
            _notes = (address, setup["page"], setup["slots"], setup["futex"], region)
    except (ValueError, KeyError, TypeError, AttributeError, StopIteration, OSError) as e:
        sys.stderr.write("elide python zygote: no exit notes: %s: %s\n" % (type(e).__name__, e))
    finally:
        for fd in fds:
            os.close(fd)


def _keep_note_slot(note):
    """Unmaps every page of the region but the job's slot (the snippet can reach no other
    execution's note) and remembers where to note the exit. Raises StepError."""
    global _note
    address, page, slots, futex, region = _notes
    slot = note["slot"]
    if not 0 <= slot < slots:
        raise StepError("exit note: slot %r out of range" % (slot,))
    offset = (1 + slot) * page
    after = slots - 1 - slot
    if (_munmap(address, offset) != 0
            or after and _munmap(address + offset + page, after * page) != 0):
        raise StepError("exit note: munmap: %s" % os.strerror(ctypes.get_errno()))
    _note = (region, address, offset, note["nonce"], os.getpid(), futex)


def _drop_notes():
    """Unmaps the whole region from a child whose job has no slot (the daemon had none free):
    the snippet must reach no execution's note. Raises StepError."""
    address, page, slots, _futex, _region = _notes
    if _munmap(address, (1 + slots) * page) != 0:
        raise StepError("exit note: munmap: %s" % os.strerror(ctypes.get_errno()))


def _write_note(code):
    """Notes the exit code for the daemon, from the job's own process only (a process the
    snippet forked runs this same code when it exits)."""
    note = _note
    if note is not None and os.getpid() == note[4]:
        buf, address, offset, nonce, _pid, futex = note
        # The nonce first: the daemon reads it once it sees the word.
        _NOTE_NONCE.pack_into(buf, offset + 8, nonce)
        _NOTE_WORD.pack_into(buf, offset, _NOTED | (code & 0xFF))
        _syscall_addr(futex, address + offset, _FUTEX_WAKE, 1)


def _check(rc, what):
    if rc != 0:
        e = ctypes.get_errno()
        raise StepError("%s: %s" % (what, os.strerror(e)))


def _landlock_allow(ruleset_fd, path, access):
    # Added here, in the child: /proc/self must resolve to the child's own pid.
    fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        # struct landlock_path_beneath_attr is packed: u64 allowed_access, s32 parent_fd.
        attr = struct.pack("=Qi", access, fd)
        rc = _libc.syscall(_SYS_LANDLOCK_ADD_RULE, ruleset_fd, _LANDLOCK_RULE_PATH_BENEATH, attr, 0)
        _check(0 if rc == 0 else -1, "landlock_add_rule %s" % path)
    finally:
        os.close(fd)


_CapSets = _CapData * 2

# Set up by the zygote from the daemon's capability step (`_prepare_capabilities`): the mask
# every child keeps, the bounding-set drops already made for all of them, and the capset
# arguments that narrow a child's sets to the mask.
_caps_keep = None
_caps_dropped = frozenset()
_caps_header = _CapHeader(_CAP_VERSION_3, 0)
_caps_sets = _CapSets()


def _narrowed_sets(keep):
    """This process's capability sets narrowed to `keep` (a bit mask), ready for capset."""
    sets = _CapSets()
    _check(_libc.capget(ctypes.byref(_CapHeader(_CAP_VERSION_3, 0)), sets), "capget")
    for half in (0, 1):
        k = (keep >> (32 * half)) & 0xFFFFFFFF
        sets[half].effective &= k
        sets[half].permitted &= k
        sets[half].inheritable &= k
    return sets


def _prepare_capabilities(keep, bounding):
    """In the zygote, once: drops `bounding` from its bounding set, which only limits what an
    exec could grant (the zygote never execs, and keeps its own capabilities for its children's
    steps), and computes the sets a child narrows itself to. A child then makes two calls
    instead of one per dropped capability, a few hundred microseconds of ctypes less."""
    global _caps_keep, _caps_dropped, _caps_sets
    for cap in bounding:
        _check(_libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0), "prctl CAPBSET_DROP")
    _caps_sets = _narrowed_sets(keep)
    _caps_keep = keep
    _caps_dropped = frozenset(bounding)


def _limit_capabilities(keep, bounding):
    """What the daemon's cold spawn does (`caps::limit`): keep only `keep` (a bit mask)."""
    if not _caps_dropped.issuperset(bounding):
        for cap in bounding:
            _check(_libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0), "prctl CAPBSET_DROP")
    if _libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0 and ctypes.get_errno() != errno.EINVAL:
        _check(-1, "prctl CAP_AMBIENT_CLEAR_ALL")
    sets = _caps_sets if keep == _caps_keep else _narrowed_sets(keep)
    _check(_libc.capset(ctypes.byref(_caps_header), sets), "capset")


def _loopback_up():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, 0)
    try:
        req = struct.pack("16sh22x", b"lo", 0)
        got = fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, req)
        flags = struct.unpack("16sh22x", got)[1] | _IFF_UP
        fcntl.ioctl(s.fileno(), _SIOCSIFFLAGS, struct.pack("16sh22x", b"lo", flags))
    finally:
        s.close()


def _unbuffer_stdio():
    # What PYTHONUNBUFFERED does at interpreter start-up: stdout and stderr write through to an
    # unbuffered raw file, and neither is line-buffered.
    for fd, name in ((1, "stdout"), (2, "stderr")):
        old = getattr(sys, name)
        raw = io.FileIO(fd, "w", closefd=False)
        raw.name = "<%s>" % name
        new = io.TextIOWrapper(raw, encoding=old.encoding, errors=old.errors, newline="\n",
                               line_buffering=False, write_through=True)
        new.mode = "w"
        setattr(sys, name, new)
        setattr(sys, "__%s__" % name, new)


def _python_signal_defaults():
    # What a freshly started interpreter has: SIGINT raises KeyboardInterrupt, SIGPIPE and
    # SIGXFSZ ignored, everything else at its default action.
    # _signal directly, with plain ints: signal.signal's enum conversions touch (copy-on-write)
    # ~30 pages more.
    for sig in _RESETTABLE_SIGNALS:
        try:
            _signal.signal(sig, _signal.SIG_DFL)
        except (OSError, ValueError, RuntimeError):
            pass
    _signal.signal(_SIGINT, _signal.default_int_handler)
    _signal.signal(_SIGPIPE, _signal.SIG_IGN)
    _signal.signal(_SIGXFSZ, _signal.SIG_IGN)
    _signal.set_wakeup_fd(-1)
    _signal.pthread_sigmask(_signal.SIG_SETMASK, ())


def _close_fds_from(low):
    # close_range(2) itself: python 3.9's os.closerange closes one fd at a time (65,533 calls,
    # 17 ms here); later ones make this same call.
    if _libc.syscall(_SYS_CLOSE_RANGE, low, ctypes.c_uint(0xFFFFFFFF), 0) != 0:
        os.closerange(low, 1 << 16)


def _write_file(path, data):
    # os-level rather than open(): the io stack's objects are pages a child would copy.
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _read_file(path):
    """The whole file, os-level (see _write_file). Raises OSError as open() would."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        os.close(fd)


# Steps that do not depend on the job, with the value a spare applies before it has one
# (see _prepare_spare); the replay skips them when the job asks for exactly that.
_AHEAD = {
    "reset_signals": None,
    "new_session": None,
    "oom_score_adj": 0,
}


def _prepare_spare():
    """Job-independent work a spare does while it waits, off the start's critical path: the
    steps in _AHEAD, and a rehearsal of the code paths every job runs (their first touch after
    the fork costs copy-on-write page faults). Returns the steps done."""
    done = set()
    try:
        _python_signal_defaults()
        done.add("reset_signals")
        os.setsid()
        done.add("new_session")
        _write_file("/proc/self/oom_score_adj", b"0")
        done.add("oom_score_adj")
    except OSError:
        pass
    try:
        _decode(b'{"token": 0, "steps": [{"step": "chdir", "path": "/"}], "env": [["A", "b"]]}')
        env = dict(_ZYGOTE_ENV)
        _coerce_c_locale(env)
        _set_environ(env)
        time.tzset()
        _locale.setlocale(_LC_CTYPE, "")
        _script_dir("/x.py")
        _read_file("/dev/null")
        compile("pass", "<elide-warmup>", "exec", dont_inherit=True)
    except Exception:
        pass
    return done


def _warm():
    """Runs the Python code every child runs (os.fork's after-fork hooks, the job's decoding,
    reports and set-up) in the zygote, before the freeze: a child then finds that code already
    specialized and its lazy state (ctypes function pointers, encoder/decoder caches) filled,
    instead of copying the pages to do it itself (~300-400 KiB less private memory per child
    on 3.11). Nothing here changes the zygote's behaviour: it is single-threaded, so
    threading's after-fork reset only rebuilds the same state, and it reseeds its own random.
    (Spares skip threading's hook, see main; running it here still leaves an idle child 50-70 KiB
    smaller, measured with `benches/zygote_alone.py --idle 50`: its locks are then made late,
    next to the objects a child touches.)"""
    for name in ("prctl", "setns", "unshare", "syscall", "clearenv", "capget", "capset", "munmap"):
        getattr(_libc, name)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    # The child's end writes its note through the same calls, here into a scratch buffer.
    global _note
    futex = _notes[3] if _notes is not None else None
    scratch = ctypes.create_string_buffer(16)
    job = {"token": 0, "steps": [{"step": "chdir", "path": "/"}, {"step": "reset_signals"}],
           "env": [["A", "b"]], "argv": ["python3", "/x.py"], "script": "/x.py"}
    try:
        # More calls than the interpreter's specialization warm-up.
        for _ in range(12):
            threading._after_fork()
            random.seed()
            # As the daemon sends a job (stdout, stderr), then as a child reports (its pidfd).
            a.sendmsg([json.dumps(job).encode()], [(_SOL_SOCKET, _SCM_RIGHTS, struct.pack("2i", 1, 2))])
            msg, fds = _recv_with_fds(b)
            for fd in fds:
                os.close(fd)
            _send_with_fd(a, b"{}", 1)
            for fd in _recv_with_fds(b)[1]:
                os.close(fd)
            env = dict(_decode(msg)["env"])
            _coerce_c_locale(env)
            _set_environ(dict(os.environ))
            dict(os.environ)
            list(os.environ.keys())
            os.environ.get("PATH")
            time.tzset()
            _locale.setlocale(_LC_CTYPE, "")
            os.close(os.pidfd_open(os.getpid()))
            _script_dir("/x.py")
            main = types.ModuleType("__warm__")
            main.__builtins__ = builtins
            exec(compile("pass", "/x.py", "exec", dont_inherit=True), main.__dict__)
            _read_file("/dev/null")
            if futex is not None:
                _note = (scratch, ctypes.addressof(scratch), 0, 1, os.getpid(), futex)
                _write_note(0)
    except Exception:
        pass
    finally:
        _note = None
        a.close()
        b.close()


# Whether this zygote runs under the daemon's syscall filter, which its children inherit.
_under_filter = False


def _filters_in_force(expected):
    """Whether the seccomp filters in force are the ones the daemon says it started us under:
    their count in /proc/self/status, or, given "any" (a kernel that does not count them),
    whether any filter is."""
    if expected == "any":
        return _libc.prctl(_PR_GET_SECCOMP, 0, 0, 0, 0) == _SECCOMP_MODE_FILTER
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Seccomp_filters:"):
                return line.split()[1] == expected
    return False


def _replay(job, fds, zygote_pid, done=frozenset()):
    """Applies the isolation steps in the daemon's order. Raises StepError naming the step."""
    stdout_fd, stderr_fd = fds[0], fds[1]
    landlock_fd = fds[2] if len(fds) > 2 else -1
    for step in job["steps"]:
        kind = step["step"]
        if kind in done and step.get("value") == _AHEAD[kind]:
            continue
        try:
            if kind == "chdir":
                os.chdir(step["path"])
            elif kind == "stdio":
                null = os.open(step["stdin"], os.O_RDONLY)
                os.dup2(null, 0)
                os.close(null)
                os.dup2(stdout_fd, 1)
                os.dup2(stderr_fd, 2)
            elif kind == "join_cgroup":
                fd = os.open(step["procs_file"], os.O_WRONLY)
                try:
                    os.write(fd, b"0")
                finally:
                    os.close(fd)
            elif kind == "reset_signals":
                _python_signal_defaults()
            elif kind == "new_session":
                os.setsid()
            elif kind == "join_netns":
                fd = os.open(step["path"], os.O_RDONLY)
                try:
                    _check(_libc.setns(fd, _CLONE_NEWNET), "setns")
                finally:
                    os.close(fd)
            elif kind == "new_netns":
                _check(_libc.unshare(_CLONE_NEWNET), "unshare(CLONE_NEWNET)")
                _loopback_up()
            elif kind == "set_rlimit":
                res = getattr(resource, "RLIMIT_" + step["resource"].upper())
                resource.setrlimit(res, (step["soft"], step["hard"]))
            elif kind == "merge_pages":
                # Already set for the zygote's whole family when its session asked; kept as a
                # step so the child's plan is the cold one.
                _check(_libc.prctl(_PR_SET_MEMORY_MERGE, 1, 0, 0, 0), "prctl PR_SET_MEMORY_MERGE")
            elif kind == "oom_score_adj":
                _write_file("/proc/self/oom_score_adj", b"%d" % step["value"])
            elif kind == "parent_death_signal":
                # Our parent is this zygote (which itself dies with the daemon).
                _check(_libc.prctl(_PR_SET_PDEATHSIG, _SIGKILL, 0, 0, 0), "prctl PDEATHSIG")
                if os.getppid() != zygote_pid:
                    raise StepError("zygote died during fork")
            elif kind == "limit_capabilities":
                _limit_capabilities(step["keep"], step["bounding"])
            elif kind == "set_groups":
                os.setgroups(step["groups"])
            elif kind == "set_gid":
                os.setgid(step["gid"])
            elif kind == "set_uid":
                os.setuid(step["uid"])
                # A cold start would exec the interpreter as this user and fail the same way.
                if not os.access(job["argv"][0], os.X_OK):
                    raise StepError(
                        "program is not executable by the execution's user "
                        "(check permissions of every directory on its path)"
                    )
            elif kind == "no_new_privs":
                _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl NO_NEW_PRIVS")
            elif kind in ("landlock", "landlock_domain"):
                if landlock_fd < 0:
                    raise StepError("no ruleset fd was passed")
                # A domain without filesystem rules ("landlock_domain") takes no path rule.
                for path in step.get("child_read_exec", ()):
                    _landlock_allow(landlock_fd, path, step["masks"]["read_exec"])
                rc = _libc.syscall(_SYS_LANDLOCK_RESTRICT_SELF, landlock_fd, 0)
                _check(0 if rc == 0 else -1, "landlock_restrict_self")
            elif kind == "syscall_filter":
                # The daemon started the zygote under the same filter, which every fork
                # inherits (checked once, at the zygote's start); a cold start installs it
                # just before exec.
                if not _under_filter:
                    raise StepError("the zygote runs without the seccomp filter")
            elif kind == "close_fds_from":
                pass  # done last, after the report to the daemon
            elif kind == "pin_cpus":
                # Rare (reserved cores): last, so the usual steps compare one name less.
                os.sched_setaffinity(0, step["cores"])
            else:
                raise StepError("unknown step")
        except StepError as e:
            raise StepError("%s: %s" % (kind, e))
        except OSError as e:
            raise StepError("%s: %s" % (kind, e))


def _exit_code_of(e):
    code = e.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    try:
        sys.stderr.write(str(code) + "\n")
    except Exception:
        pass
    return 1


def _finish(code):
    # What interpreter shutdown would do for the snippet: join non-daemon threads, run atexit
    # handlers, flush the standard streams.
    try:
        threading._shutdown()
    except BaseException:
        pass
    try:
        atexit._run_exitfuncs()
    except BaseException:
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            if code == 0:
                code = 120
    # Everything of the snippet is out; the daemon may answer its waiters before the kernel
    # has torn this process down.
    _write_note(code)
    os._exit(code)


def _script_dir(script):
    """The script's directory, as the interpreter puts it first on sys.path. The daemon sends
    real paths, whose directory is the text before the last slash; anything else takes the
    long way."""
    if script[:1] == "/" and "//" not in script and "/." not in script:
        return script.rpartition("/")[0] or "/"
    return os.path.dirname(os.path.abspath(script))


def _run_main(job):
    argv = job["argv"]
    script = job["script"]
    sys.argv = list(argv[1:])
    sys.path[0] = _script_dir(script)
    try:
        source = _read_file(script)
    except OSError as e:
        sys.stderr.write("%s: can't open file %r: [Errno %d] %s\n" % (argv[0], script, e.errno, e.strerror))
        _finish(2)
    main = types.ModuleType("__main__")
    main.__file__ = script
    main.__cached__ = None
    main.__builtins__ = builtins
    sys.modules["__main__"] = main
    try:
        code = compile(source, script, "exec", dont_inherit=True)
        exec(code, main.__dict__)
    except SystemExit as e:
        _finish(_exit_code_of(e))
    except KeyboardInterrupt:
        traceback.print_exc()
        try:
            sys.stderr.flush()
        except BaseException:
            pass
        # Like the interpreter: die of SIGINT so the parent sees the signal.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        _finish(130)
    except BaseException:
        etype, value, tb = sys.exc_info()
        # Hide our frames: the traceback starts at the snippet, as with a cold interpreter.
        while tb is not None and tb.tb_frame.f_code.co_filename == _OWN_FILE:
            tb = tb.tb_next
        try:
            if value is not None:
                value.__traceback__ = tb
            sys.excepthook(etype, value, tb)
        except BaseException:
            pass
        _finish(1)
    _finish(0)


def _child(sock, job, fds, zygote_pid, done=frozenset()):
    token = job["token"]
    try:
        if _notes is not None:
            if job.get("note"):
                _keep_note_slot(job["note"])
            else:
                _drop_notes()
        _replay(job, fds, zygote_pid, done)
        env = dict(job["env"])
        _coerce_c_locale(env)
        _set_environ(env)
        if env.get("PYTHONUNBUFFERED"):
            _unbuffer_stdio()
        time.tzset()
        try:
            _locale.setlocale(_LC_CTYPE, "")
        except _locale.Error:
            pass
        for fd in fds:
            if fd > 2:
                os.close(fd)
        if job.get("outlive_zygote"):
            # From the ready report on, the daemon holds our pidfd and learns our end without
            # the zygote, so the zygote's death need not end us (the daemon's does: its reaper
            # empties our cgroup). Let go before the report, so no start the daemon answered can
            # still die with the zygote. A zygote dying before the report is no risk: the daemon
            # then shuts its socket, our report fails, and we exit unrun (it starts cold).
            _check(_libc.prctl(_PR_SET_PDEATHSIG, 0, 0, 0, 0), "prctl PDEATHSIG")
        pidfd = os.pidfd_open(os.getpid())
        _send_with_fd(sock, b'{"ready": %d, "pid": %d}' % (token, os.getpid()), pidfd)
        os.close(pidfd)
    except BaseException as e:
        try:
            sock.send(json.dumps({"failed": token, "error": str(e)}).encode())
        except OSError:
            pass
        os._exit(127)
    # The C close under socket.close's two Python frames.
    _socket.socket.close(sock)
    _close_fds_from(3)
    gc.enable()
    _run_main(job)


def _drain(fd):
    """Reads a non-blocking pipe empty; what it held."""
    chunks = []
    try:
        while True:
            data = os.read(fd, 4096)
            if not data:
                break
            chunks.append(data)
    except (BlockingIOError, InterruptedError):
        pass
    return b"".join(chunks)


def _taken(fd):
    """Pids of the spares that took a job since the last call (their 4-byte notes)."""
    return [p for (p,) in struct.iter_unpack("i", _drain(fd))]


# A job's own "token" key: inside a JSON string a quote is escaped, so only the key matches.
_TOKEN = re.compile(rb'"token":\s*(\d+)')


def _decline_queued(sock):
    """Hands back the jobs waiting on the socket while no spare is there to take them (forks
    fail): each would wait for the next fork that works, while the daemon, told so, starts it
    cold at once. Jobs sent before the daemon read our {"empty": true} are the ones found here.
    A job carries its task's environment (secrets too) and every later spare inherits this
    process's heap: the job is read into a buffer that is zeroed after use, and only its
    token is taken out of it, so no part of it outlives this call."""
    try:
        buf = bytearray(_MAX_MESSAGE)
    except MemoryError:
        # The jobs wait for the next fork that works.
        return
    while True:
        try:
            # recvmsg itself: socket.recv_fds drops its flags on 3.11, and would block.
            n, ancdata, _flags, _addr = sock.recvmsg_into([buf], _FDS_SPACE, socket.MSG_DONTWAIT)
        except OSError:
            # Nothing queued (EAGAIN), or a broken socket, which the poll loop sees as a hang-up.
            return
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                for (fd,) in struct.iter_unpack("i", data[: len(data) - len(data) % 4]):
                    os.close(fd)
        if not n:
            # The daemon closed the pool.
            os._exit(0)
        found = _TOKEN.search(buf, 0, n)
        token = int(found.group(1)) if found else None
        buf[:n] = bytes(n)
        if token is not None:
            _tell(sock, b'{"declined": %d}' % token)


def _spare(sock, taken_w, zygote_pid):
    """A pre-forked child: waits for one job, tells the zygote it took it, then runs it."""
    # Until the job's own steps run, an orphaned spare must not linger.
    _libc.prctl(_PR_SET_PDEATHSIG, _SIGKILL, 0, 0, 0)
    if os.getppid() != zygote_pid:
        os._exit(0)
    done = _prepare_spare()
    while True:
        try:
            msg, fds = _recv_with_fds(sock)
            break
        except InterruptedError:
            continue
        except OSError:
            os._exit(0)
    # One write of 4 bytes: atomic on a pipe, so notes of concurrent spares never interleave.
    os.write(taken_w, struct.pack("i", os.getpid()))
    os.close(taken_w)
    if not msg:
        # The daemon closed the pool.
        os._exit(0)
    try:
        job = _decode(msg)
        token = job["token"]
    except (ValueError, KeyError, TypeError, StopIteration):
        os._exit(0)
    try:
        # Formatted, not json.dumps: the encoder's Python code is pages a child would copy.
        sock.send(b'{"forked": %d, "pid": %d}' % (token, os.getpid()))
    except OSError:
        os._exit(127)
    _child(sock, job, fds, zygote_pid, done)
    os._exit(127)


def main():
    if not hasattr(os, "pidfd_open"):
        # The daemon does not start a zygote on a python older than 3.9; this one would fork
        # spares that die at once, and jobs would wait on the socket for nobody.
        sys.stderr.write("elide python zygote: python %s lacks os.pidfd_open "
                         "(3.9 or newer needed)\n" % sys.version.split()[0])
        sys.exit(3)
    # Move the daemon's socket off fd 0 (children put /dev/null there) and keep it inheritable
    # by forks only: a child closes it itself once it has reported.
    sock = socket.socket(fileno=os.dup(0))
    _map_notes(sock)
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    zygote_pid = os.getpid()
    spares = max(1, int(sys.argv[1])) if len(sys.argv) > 1 else 1
    if len(sys.argv) > 2:
        caps = json.loads(sys.argv[2])
        _prepare_capabilities(caps["keep"], caps["bounding"])
    if len(sys.argv) > 3:
        global _under_filter
        _under_filter = _filters_in_force(sys.argv[3])
    sig_r, sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    taken_r, taken_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(sig_w)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    poller = select.poll()
    # Only a hang-up of the socket: its data belongs to the spare.
    poller.register(sock.fileno(), select.POLLRDHUP)
    poller.register(taken_r, select.POLLIN)
    poller.register(sig_r, select.POLLIN)
    _warm()
    # Everything allocated so far stays untouched by the collector in the children, so
    # their pages are not dirtied by gc bookkeeping.
    gc.collect()
    gc.freeze()
    gc.disable()
    # threading's after-fork hook rebuilds its locks and thread table for the forking thread:
    # for this single-threaded zygote that state is already right in a copy, and the hook is
    # ~120 copied pages (0.5 ms) per fork here. Off for the spares' forks only: a spare puts it
    # back before any snippet could fork.
    hook = getattr(threading, "_after_fork", None)
    hook_code = getattr(hook, "__code__", None)
    if (hook_code is None or hook_code.co_argcount or hook_code.co_freevars
            or threading.active_count() != 1):
        hook = None  # another python's hook, or threads: leave it be
    else:
        hook.__code__ = (lambda: None).__code__

    def fork_spare():
        pid = os.fork()
        if pid == 0:
            if hook is not None:
                hook.__code__ = hook_code
            # The thread table's main thread is the zygote's: a cold interpreter's shows its own
            # id (CPython's own after-fork hook leaves it stale too).
            if getattr(threading._main_thread, "_native_id", None) is not None:
                threading._main_thread._native_id = threading.get_native_id()
            _signal.set_wakeup_fd(-1)
            _signal.signal(_SIGCHLD, _signal.SIG_DFL)
            os.close(sig_r)
            os.close(sig_w)
            os.close(taken_r)
            try:
                _spare(sock, taken_w, zygote_pid)
            finally:
                os._exit(127)
        return pid

    idle = set()
    starved = False
    told_empty = False

    def refill():
        """Forks spares up to the pool size. A fork refused for want of pids or memory must not
        end the zygote (its running children would die with it): it sets `starved`, and the
        loop tries again shortly. While that leaves no spare at all, the daemon is told
        ({"empty": true}), so it starts executions cold instead of queueing them here."""
        nonlocal starved, told_empty
        while len(idle) < spares:
            try:
                idle.add(fork_spare())
            except OSError as e:
                if not starved:
                    sys.stderr.write("elide python zygote: cannot fork a spare (%s); retrying\n" % e)
                    sys.stderr.flush()
                starved = True
                break
        else:
            starved = False
        empty = not idle
        if empty != told_empty:
            _tell(sock, json.dumps({"empty": empty}).encode())
            told_empty = empty
        if empty:
            _decline_queued(sock)

    refill()
    _tell(sock, json.dumps({"hello": zygote_pid}).encode())

    # Everything this loop touches is copied again (copy-on-write) after each fork, so it keeps
    # to few objects: one read for a pipe poll found readable (no exception, as _drain raises
    # and catches one), formatted replies rather than json.dumps.
    sock_fd = sock.fileno()
    refill_due = None
    while True:
        timeout = _FORK_RETRY_MS if starved else None
        if refill_due is not None:
            wait = max(0, int((refill_due - time.monotonic()) * 1000) + 1)
            timeout = wait if timeout is None else min(timeout, wait)
        try:
            events = poller.poll(timeout)
        except InterruptedError:
            continue
        for fd, _ev in events:
            if fd == taken_r:
                idle.difference_update([p for (p,) in struct.iter_unpack("i", os.read(taken_r, 1 << 16))])
            elif fd == sig_r:
                os.read(sig_r, 1 << 16)
            elif fd == sock_fd:
                # Registered for hang-ups only: the daemon closed the pool, and children die
                # with us (PDEATHSIG).
                os._exit(0)
        # Reap after every wake-up: a SIGCHLD may have arrived while we were busy.
        ended = False
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            ended = True
            if pid in idle:
                # A spare writes its note before anything else, so one that took a job and
                # already ended has its note in the pipe by now.
                idle.difference_update(_taken(taken_r))
            if pid in idle:
                # Died idle (killed from outside): no job to report, only a spare to replace.
                idle.discard(pid)
                continue
            _tell(sock, b'{"exit": %d, "status": %d}' % (pid, status))
        # The replacement's fork and preparation (about 1.5 ms of CPU here) would run beside
        # the job that just took a spare, on the cores its start needs. While more than half
        # the pool is idle, they wait for a child's end (its exit then travels through the
        # daemon and the plugin, mostly one core's work), or _REFILL_LATE_MS at the latest.
        if (len(idle) >= spares or ended or starved or 2 * len(idle) <= spares
                or (refill_due is not None and time.monotonic() >= refill_due)):
            refill()
            refill_due = None
        elif refill_due is None:
            refill_due = time.monotonic() + _REFILL_LATE_MS / 1000


if __name__ == "__main__":
    main()
