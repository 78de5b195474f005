//! Applies an execution's isolation to a `std::process::Command`: everything is resolved and
//! opened in the parent, then ONE `pre_exec` runs the steps in the order they must happen.
//!
//! Ordering (RUST_NOTES §4): std performs stdio redirection and `chdir` before `pre_exec`
//! closures, and would also do `setgid`/`setuid` before them, so we never use `Command::uid`:
//! privileged steps (cgroup join, namespaces) run first inside our closure, then we drop
//! privileges ourselves, then confine the filesystem.
//!
//! `PR_SET_PDEATHSIG` fires when the *thread* that forked exits: call `spawn` on the command
//! from a long-lived thread (a dedicated spawner thread or a runtime worker), never from a
//! `spawn_blocking` thread that may retire.

use super::SandboxError;
use super::caps;
use super::cpus::{self, Cpus};
use super::landlock_rules::{self, FsPolicy};
use super::netns;
use super::open_files;
use super::page_merge;
use super::syscall_filter;
use super::user::ResolvedUser;
use serde::{Deserialize, Serialize};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Which ambient capabilities an execution keeps (all true = no restriction).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intrinsics {
    /// When true, `apply` leaves the Command's environment alone: the child gets whatever the
    /// Command carries, which includes the daemon's own environment unless the caller called
    /// `env_clear()` (the daemon does, to pass exactly the requested variables). When false,
    /// the inherited environment is dropped and the child sees only a minimal environment
    /// ([`IsolationSpec::base_env`]) plus the variables set explicitly on the Command.
    pub env: bool,
    /// Filesystem beyond the working dir and runtime files; when false Landlock confines it.
    pub io: bool,
    /// Host network; when false the child gets its own network namespace with loopback only.
    pub net: bool,
}

impl Intrinsics {
    /// Everything allowed.
    pub const ALL: Intrinsics = Intrinsics {
        env: true,
        io: true,
        net: true,
    };
    /// Everything isolated.
    pub const NONE: Intrinsics = Intrinsics {
        env: false,
        io: false,
        net: false,
    };
}

impl Default for Intrinsics {
    fn default() -> Self {
        Intrinsics::ALL
    }
}

/// What the child is to the daemon: decides what reaches across its borders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A snippet: a Landlock domain of its own (signals and ptrace scoped, ABI ≥ 6), so neither
    /// the daemon nor another execution is in its reach; `oom_score_adj` 0.
    Execution,
    /// An operator's exec session into a task: reaches what its user may, the task's processes
    /// included (a domain of its own would shut them out); `oom_score_adj` 0.
    ExecSession,
    /// The daemon's own machinery (the python zygote, whose children each make their own
    /// domain): reaches what its user may, and keeps the daemon's `oom_score_adj`, so an
    /// operator who shields the daemon from the OOM killer shields it too (its death would end
    /// the executions it forked).
    DaemonHelper,
}

impl Role {
    fn own_domain(self) -> bool {
        self == Role::Execution
    }

    fn resets_oom_score(self) -> bool {
        self != Role::DaemonHelper
    }

    /// Whether the child keeps only [`caps::KEPT`]: the zygote keeps the daemon's, since its
    /// children need them for their own isolation steps (network namespaces) and drop them
    /// themselves.
    fn limits_capabilities(self) -> bool {
        self != Role::DaemonHelper
    }
}

/// Everything needed to isolate one execution. Built by the daemon, consumed by [`apply`].
///
/// [`apply`]: IsolationSpec::apply
#[derive(Debug)]
pub struct IsolationSpec {
    /// Run as this user (requires a root daemon); `None` keeps the daemon's user.
    pub user: Option<ResolvedUser>,
    /// Absolute, existing directory; the child's cwd and its writable area when `io` is off.
    pub working_dir: PathBuf,
    pub intrinsics: Intrinsics,
    /// What the child is to the daemon: an execution, or not (see [`Role`]).
    pub role: Role,
    /// Readable (and executable) when `io` is off: runtime install dirs, script, libraries.
    pub read_paths: Vec<PathBuf>,
    /// Writable when `io` is off, besides `working_dir`.
    pub write_paths: Vec<PathBuf>,
    /// Join this network namespace (Nomad group networking) when `net` is on.
    pub network_namespace: Option<PathBuf>,
    /// Files the child writes `0` to, to join its cgroup (one on v2, one per hierarchy on v1;
    /// see `ExecutionCgroup::self_join_files`).
    pub cgroup_procs: Vec<PathBuf>,
    /// The cores to pin the child to (Nomad's reserved cores, [`cpus`]); `None` leaves its
    /// affinity as inherited.
    pub cpus: Option<Cpus>,
    /// Offer the child's memory for merging with identical pages of other such processes
    /// ([`page_merge`]); the caller checks [`page_merge::available`].
    pub merge_pages: bool,
    /// Output sinks, already opened by [`super::sink::open_sink`].
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// One step of the isolation sequence, as data (for logs and for replaying it elsewhere, e.g.
/// in a forked zygote child).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum PlanStep {
    /// Done by std before pre_exec; listed so a replayer does it too.
    Chdir {
        path: PathBuf,
    },
    /// stdin from /dev/null, stdout/stderr onto the sinks (done by std before pre_exec).
    Stdio {
        stdin: PathBuf,
    },
    /// Write "0" to this cgroup.procs file.
    JoinCgroup {
        procs_file: PathBuf,
    },
    /// `sched_setaffinity(0, cores)`: pinned to the task's reserved cores.
    PinCpus {
        cores: Cpus,
    },
    /// Every catchable signal back to its default action (ignored ones survive exec).
    ResetSignals,
    /// `setsid()`: own session and process group, so signals reach the whole execution.
    NewSession,
    /// `setns(open(path), CLONE_NEWNET)`.
    JoinNetns {
        path: PathBuf,
    },
    /// `unshare(CLONE_NEWNET)` then `lo` up via SIOCSIFFLAGS.
    NewNetns,
    /// `setrlimit(resource, soft, hard)`.
    SetRlimit {
        resource: String,
        soft: u64,
        hard: u64,
    },
    /// `prctl(PR_SET_MEMORY_MERGE, 1)`: the memory of the process, and of what it forks and
    /// execs, is offered for merging with identical pages ([`page_merge`]).
    MergePages,
    /// Write `value` to /proc/self/oom_score_adj (the daemon itself may be protected).
    OomScoreAdj {
        value: i32,
    },
    /// `prctl(PR_SET_PDEATHSIG, signal)` then exit if the parent is no longer `parent_pid`.
    ParentDeathSignal {
        signal: String,
        parent_pid: u32,
    },
    /// Keep only the capabilities in `keep` (a bit mask, [`caps::KEPT`]): drop `bounding` from
    /// the bounding set, clear the ambient set, narrow effective, permitted and inheritable.
    LimitCapabilities {
        keep: u64,
        bounding: Vec<u32>,
    },
    SetGroups {
        groups: Vec<u32>,
    },
    SetGid {
        gid: u32,
    },
    SetUid {
        uid: u32,
    },
    /// `prctl(PR_SET_NO_NEW_PRIVS, 1)`: setuid binaries cannot regain privileges.
    NoNewPrivs,
    /// Landlock `restrict_self` with these rules (everything else denied). `child_read_exec`
    /// rules must be added in the child itself, just before restricting (`/proc/self` must
    /// resolve to the child's pid).
    Landlock {
        read_exec: Vec<PathBuf>,
        read_write: Vec<PathBuf>,
        child_read_exec: Vec<PathBuf>,
        masks: landlock_rules::AccessMasks,
    },
    /// Landlock `restrict_self` with a ruleset that confines nothing on the filesystem
    /// ([`landlock_rules::build_domain`]), for `io` on: the execution becomes a domain of its
    /// own, out of which it cannot signal or trace the daemon or other executions, nor open
    /// their memory.
    LandlockDomain,
    /// The seccomp filter of [`syscall_filter`] (after Landlock, which needs a syscall it
    /// does not refuse, but kept last among the confining steps). The python zygote runs under
    /// it already, so its children check it is in force rather than install it again.
    SyscallFilter,
    /// Mark every fd >= `from` close-on-exec (`close_range(from, ~0, CLOSE_RANGE_CLOEXEC)`).
    CloseFdsFrom {
        from: i32,
    },
}

/// The ordered isolation steps of an execution.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IsolationPlan {
    pub steps: Vec<PlanStep>,
    /// Environment replacing the inherited one (`env` intrinsic off); `None` = inherit.
    pub base_env: Option<Vec<(String, String)>>,
}

/// PATH for executions without the `env` intrinsic.
pub const MINIMAL_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;

impl IsolationSpec {
    fn fs_policy(&self) -> FsPolicy {
        FsPolicy::for_execution(&self.working_dir, &self.read_paths, &self.write_paths)
    }

    /// The environment the child starts from when `env` is off: PATH, HOME, LANG, USER.
    pub fn base_env(&self) -> Option<Vec<(String, String)>> {
        if self.intrinsics.env {
            return None;
        }
        let home = self
            .user
            .as_ref()
            .and_then(|u| u.home.clone())
            .unwrap_or_else(|| self.working_dir.clone());
        let mut env = vec![
            ("PATH".to_string(), MINIMAL_PATH.to_string()),
            ("HOME".to_string(), home.to_string_lossy().into_owned()),
            ("LANG".to_string(), "C.UTF-8".to_string()),
        ];
        if let Some(name) = self.user.as_ref().and_then(|u| u.name.clone()) {
            env.push(("USER".to_string(), name.clone()));
            env.push(("LOGNAME".to_string(), name));
        }
        Some(env)
    }

    /// The Landlock ruleset the child restricts itself with: the filesystem policy with `io`
    /// off, a domain without filesystem rules with `io` on (an execution, where the kernel
    /// scopes signals), none otherwise. Built in the parent, opening every policy path here;
    /// another launcher (the python zygote) passes the fd on.
    pub fn landlock_ruleset(&self) -> Result<Option<OwnedFd>, SandboxError> {
        if self.intrinsics.io {
            return Ok(if self.role.own_domain() {
                landlock_rules::build_domain()?
            } else {
                None
            });
        }
        // A missing read path grants nothing and is skipped (runtimes list optional dirs); a
        // missing write path is a request we cannot honour.
        let mut required = vec![self.working_dir.clone()];
        required.extend(self.write_paths.iter().cloned());
        Ok(Some(landlock_rules::build_ruleset(
            &self.fs_policy(),
            &required,
            self.role.own_domain(),
        )?))
    }

    /// The steps [`apply`](Self::apply) performs, in order, as data.
    pub fn plan(&self) -> IsolationPlan {
        let mut steps = vec![
            PlanStep::Chdir {
                path: self.working_dir.clone(),
            },
            PlanStep::Stdio {
                stdin: PathBuf::from("/dev/null"),
            },
        ];
        steps.extend(self.cgroup_procs.iter().map(|p| PlanStep::JoinCgroup {
            procs_file: p.clone(),
        }));
        if let Some(c) = &self.cpus {
            steps.push(PlanStep::PinCpus { cores: c.clone() });
        }
        steps.push(PlanStep::ResetSignals);
        steps.push(PlanStep::NewSession);
        match (self.intrinsics.net, &self.network_namespace) {
            (false, _) => steps.push(PlanStep::NewNetns),
            (true, Some(p)) => steps.push(PlanStep::JoinNetns { path: p.clone() }),
            (true, None) => {}
        }
        steps.push(PlanStep::SetRlimit {
            resource: "core".to_string(),
            soft: 0,
            hard: 0,
        });
        if self.merge_pages {
            steps.push(PlanStep::MergePages);
        }
        if self.role.resets_oom_score() {
            steps.push(PlanStep::OomScoreAdj { value: 0 });
        }
        if self.role.limits_capabilities() {
            steps.push(PlanStep::LimitCapabilities {
                keep: caps::kept_mask(),
                bounding: caps::bounding_drops().to_vec(),
            });
        }
        if let Some(u) = &self.user {
            steps.push(PlanStep::SetGroups {
                groups: u.groups.clone(),
            });
            steps.push(PlanStep::SetGid { gid: u.gid });
            steps.push(PlanStep::SetUid { uid: u.uid });
        }
        // After the user switch: the kernel clears the parent-death signal when the uid or
        // gid changes.
        steps.push(PlanStep::ParentDeathSignal {
            signal: "SIGKILL".to_string(),
            parent_pid: std::process::id(),
        });
        steps.push(PlanStep::NoNewPrivs);
        if !self.intrinsics.io {
            let p = self.fs_policy();
            steps.push(PlanStep::Landlock {
                read_exec: p.read_exec,
                read_write: p.read_write,
                child_read_exec: vec![PathBuf::from("/proc/self")],
                masks: landlock_rules::access_masks(self.role.own_domain()),
            });
        } else if self.role.own_domain() && landlock_rules::domains_available() {
            steps.push(PlanStep::LandlockDomain);
        }
        if syscall_filter::filter().is_ok() {
            steps.push(PlanStep::SyscallFilter);
        }
        steps.push(PlanStep::CloseFdsFrom { from: 3 });
        if let Some(l) = open_files::for_children() {
            steps.push(PlanStep::SetRlimit {
                resource: "nofile".to_string(),
                soft: l.soft,
                hard: l.hard,
            });
        }
        IsolationPlan {
            steps,
            base_env: self.base_env(),
        }
    }

    /// Makes `cmd` spawn an isolated execution: sets cwd, stdio, environment (when `env` is
    /// off) and installs one async-signal-safe `pre_exec` doing the rest (see [`plan`]).
    ///
    /// Do not call `uid`, `gid`, `process_group` or `pre_exec` on `cmd` yourself. Environment
    /// variables set on `cmd` before this call are kept when `env` is off.
    ///
    /// [`plan`]: Self::plan
    pub fn apply(self, cmd: &mut Command) -> Result<(), SandboxError> {
        let wd = &self.working_dir;
        if !wd.is_absolute() {
            return Err(SandboxError::WorkingDir {
                path: wd.clone(),
                reason: "must be an absolute path".to_string(),
            });
        }
        match std::fs::metadata(wd) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(SandboxError::WorkingDir {
                    path: wd.clone(),
                    reason: "is not a directory".to_string(),
                });
            }
            Err(e) => {
                return Err(SandboxError::WorkingDir {
                    path: wd.clone(),
                    reason: e.to_string(),
                });
            }
        }

        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        if let Some(u) = &self.user
            && euid != 0
            && (u.uid != euid || u.gid != unsafe { libc::getegid() })
        {
            return Err(SandboxError::Privilege {
                what: format!("running as user {:?}", u.spec),
                needs: "a daemon running as root",
            });
        }
        let cgroup_fds = self
            .cgroup_procs
            .iter()
            .map(|p| open_for_write(p, "cgroup membership file"))
            .collect::<Result<Vec<OwnedFd>, _>>()?;
        let netns_fd = match (self.intrinsics.net, &self.network_namespace) {
            (true, Some(p)) => Some(netns::open_netns(p)?),
            _ => None,
        };
        let landlock_fd = self.landlock_ruleset()?;
        let base_env = self.base_env();

        let child = ChildSteps {
            cgroup_fds: cgroup_fds.iter().map(AsRawFd::as_raw_fd).collect(),
            cpus: self.cpus.as_ref().map(Cpus::to_set),
            new_netns: !self.intrinsics.net,
            netns_fd: netns_fd.as_ref().map(AsRawFd::as_raw_fd),
            parent_pid: std::process::id() as libc::pid_t,
            open_files: open_files::for_children(),
            merge_pages: self.merge_pages,
            reset_oom_score: self.role.resets_oom_score(),
            // Read here, before the fork: the child must not allocate.
            capabilities: self
                .role
                .limits_capabilities()
                .then(|| (caps::kept_mask(), caps::bounding_drops())),
            // A non-root daemon may "switch" only to itself (checked above): nothing to do.
            user: self
                .user
                .as_ref()
                .filter(|_| euid == 0)
                .map(|u| (u.groups.clone(), u.gid, u.uid)),
            landlock_fd: landlock_fd.as_ref().map(AsRawFd::as_raw_fd),
            // A domain without filesystem rules takes no path rule.
            landlock_proc_access: (!self.intrinsics.io)
                .then(|| landlock_rules::access_masks(true).read_exec),
            program_check: self.user.as_ref().and_then(|_| {
                let program = Path::new(cmd.get_program());
                program
                    .is_absolute()
                    .then(|| std::ffi::CString::new(program.as_os_str().as_encoded_bytes()).ok())
                    .flatten()
            }),
            syscall_filter: syscall_filter::filter().ok(),
        };
        // The fds must stay open until the fork: the closure owns them.
        let keep_open = (cgroup_fds, netns_fd, landlock_fd);

        cmd.current_dir(&self.working_dir);
        cmd.stdin(Stdio::null());
        cmd.stdout(Stdio::from(self.stdout));
        cmd.stderr(Stdio::from(self.stderr));
        if let Some(base) = base_env {
            let explicit: Vec<(std::ffi::OsString, Option<std::ffi::OsString>)> = cmd
                .get_envs()
                .map(|(k, v)| (k.to_os_string(), v.map(|v| v.to_os_string())))
                .collect();
            cmd.env_clear();
            cmd.envs(base);
            for (k, v) in explicit {
                match v {
                    Some(v) => cmd.env(k, v),
                    None => cmd.env_remove(k),
                };
            }
        }
        if !self.intrinsics.io && cmd.get_envs().all(|(k, _)| k != "TMPDIR") {
            // /tmp is out of reach under Landlock; give temp files a home that works.
            cmd.env("TMPDIR", &self.working_dir);
        }

        // SAFETY: the closure only performs async-signal-safe syscalls on data prepared above;
        // it allocates nothing and takes no locks.
        unsafe {
            cmd.pre_exec(move || {
                let _ = &keep_open;
                child.run()
            });
        }
        Ok(())
    }
}

fn open_for_write(path: &Path, what: &'static str) -> Result<OwnedFd, SandboxError> {
    nix::fcntl::open(
        path,
        nix::fcntl::OFlag::O_WRONLY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| SandboxError::Open {
        what,
        path: path.to_path_buf(),
        source: e.into(),
    })
}

/// Everything the child needs, as plain integers and pre-allocated vectors.
struct ChildSteps {
    cgroup_fds: Vec<RawFd>,
    /// The affinity mask of the task's reserved cores.
    cpus: Option<libc::cpu_set_t>,
    new_netns: bool,
    netns_fd: Option<RawFd>,
    parent_pid: libc::pid_t,
    /// The open-file limits the daemon was started with, when it raised its own.
    open_files: Option<open_files::Limits>,
    merge_pages: bool,
    reset_oom_score: bool,
    /// Keep only these capabilities, dropping these from the bounding set ([`caps::limit`]).
    capabilities: Option<(u64, &'static [u32])>,
    user: Option<(Vec<u32>, u32, u32)>,
    landlock_fd: Option<RawFd>,
    /// Access granted to the child's own /proc/self (read/execute bits), when the ruleset
    /// confines the filesystem.
    landlock_proc_access: Option<u64>,
    /// The program, checked for execute permission as the new user so the failure names
    /// itself instead of surfacing as a bare EACCES from exec.
    program_check: Option<std::ffi::CString>,
    /// The seccomp filter, where this machine takes one.
    syscall_filter: Option<&'static seccompiler::BpfProgram>,
}

fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Reports a failed step on the child's stderr (already the sink) and turns errno into the
/// error std hands back from `spawn`. Async-signal-safe.
fn fail(step: &[u8], err: i32) -> std::io::Error {
    let prefix: &[u8] = b"elide-sandbox: isolation step failed before exec: ";
    // SAFETY: write(2) on fd 2 with valid buffers.
    unsafe {
        libc::write(2, prefix.as_ptr().cast(), prefix.len());
        libc::write(2, step.as_ptr().cast(), step.len());
        libc::write(2, b"\n".as_ptr().cast(), 1);
    }
    std::io::Error::from_raw_os_error(err)
}

/// The kernel's `struct sigaction` for `rt_sigaction` (x86_64 layout).
#[cfg(target_arch = "x86_64")]
#[repr(C)]
struct KernelSigaction {
    handler: usize,
    flags: libc::c_ulong,
    restorer: usize,
    mask: u64,
}

/// Sets every catchable signal to its default action. Ignored signals survive exec, and the
/// daemon may have been started with some ignored (a real-time signal, SIGPIPE...).
/// Uses the raw syscall because glibc's `sigaction` refuses the signals it reserves (32, 33),
/// which a parent may still have set to ignored. Async-signal-safe.
#[cfg(not(target_arch = "x86_64"))]
fn reset_signal_dispositions() {
    for sig in 1..=64 {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            // SAFETY: signal(2) with SIG_DFL; glibc-reserved signals just fail.
            unsafe { libc::signal(sig, libc::SIG_DFL) };
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn reset_signal_dispositions() {
    let default = KernelSigaction {
        handler: libc::SIG_DFL,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    for sig in 1..=64 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: rt_sigaction with a valid struct of the size the kernel expects.
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                &default as *const KernelSigaction,
                std::ptr::null_mut::<KernelSigaction>(),
                8usize,
            );
        }
    }
}

/// Whether /proc/self/oom_score_adj reads "0". Async-signal-safe (stack buffer only).
fn oom_score_adj_is_zero() -> bool {
    let mut buf = [0u8; 16];
    // SAFETY: open/read/close with a stack buffer.
    let n = unsafe {
        let fd = libc::open(
            c"/proc/self/oom_score_adj".as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        );
        if fd < 0 {
            return false;
        }
        let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
        libc::close(fd);
        n
    };
    n >= 1 && buf[0] == b'0' && (n == 1 || buf[1] == b'\n')
}

impl ChildSteps {
    /// Runs in the forked child. Only raw syscalls.
    fn run(&self) -> std::io::Result<()> {
        // SAFETY: every call below is an async-signal-safe syscall wrapper on integers or on
        // buffers owned by `self`, which lives until exec.
        unsafe {
            for &fd in &self.cgroup_fds {
                let zero = b"0";
                if libc::write(fd, zero.as_ptr().cast(), zero.len()) < 0 {
                    return Err(fail(b"join cgroup", errno()));
                }
            }
            if let Some(set) = &self.cpus
                && let Err(e) = cpus::pin(0, set)
            {
                return Err(fail(
                    b"sched_setaffinity (reserved cores)",
                    e.raw_os_error().unwrap_or(libc::EIO),
                ));
            }
            reset_signal_dispositions();
            if libc::setsid() < 0 {
                let e = errno();
                // Already a group leader (someone set process_group): still its own group.
                if !(e == libc::EPERM && libc::getpgrp() == libc::getpid()) {
                    return Err(fail(b"setsid", e));
                }
            }
            if self.new_netns {
                if let Err(e) = netns::unshare_with_loopback() {
                    return Err(fail(b"new network namespace with loopback up", e));
                }
            } else if let Some(fd) = self.netns_fd
                && let Err(e) = netns::join(fd)
            {
                return Err(fail(b"join network namespace", e));
            }
            let no_core = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            if libc::setrlimit(libc::RLIMIT_CORE, &no_core) != 0 {
                return Err(fail(b"setrlimit core", errno()));
            }
            if self.merge_pages
                && let Err(e) = page_merge::offer_own_memory()
            {
                return Err(fail(b"prctl PR_SET_MEMORY_MERGE", e));
            }
            // Only write when needed, so hosts with a read-only /proc still work for the
            // common case of a daemon at the default score.
            if self.reset_oom_score && !oom_score_adj_is_zero() {
                let adj = libc::open(
                    c"/proc/self/oom_score_adj".as_ptr(),
                    libc::O_WRONLY | libc::O_CLOEXEC,
                );
                if adj < 0 {
                    return Err(fail(b"open oom_score_adj", errno()));
                }
                let ok = libc::write(adj, b"0".as_ptr().cast(), 1) == 1;
                let e = errno();
                libc::close(adj);
                if !ok {
                    return Err(fail(b"write oom_score_adj", e));
                }
            }
            if let Some((keep, bounding)) = self.capabilities
                && let Err((step, e)) = caps::limit(keep, bounding)
            {
                return Err(fail(step, e));
            }
            if let Some((groups, gid, uid)) = &self.user {
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0 {
                    return Err(fail(b"setgroups", errno()));
                }
                if libc::setgid(*gid) != 0 {
                    return Err(fail(b"setgid", errno()));
                }
                if libc::setuid(*uid) != 0 {
                    return Err(fail(b"setuid", errno()));
                }
                if let Some(program) = &self.program_check
                    && libc::access(program.as_ptr(), libc::X_OK) != 0
                {
                    return Err(fail(
                        b"program is not executable by the execution's user (check permissions of every directory on its path)",
                        errno(),
                    ));
                }
            }
            // After the user switch, which clears the parent-death signal.
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(fail(b"prctl PDEATHSIG", errno()));
            }
            // The parent may have died between fork and prctl: the signal would never come.
            if libc::getppid() != self.parent_pid {
                return Err(fail(b"parent died during spawn", libc::ESRCH));
            }
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(fail(b"prctl NO_NEW_PRIVS", errno()));
            }
            if let Some(fd) = self.landlock_fd {
                if let Some(access) = self.landlock_proc_access
                    && let Err(e) = landlock_rules::allow_proc_self(fd, access)
                {
                    return Err(fail(b"landlock rule for /proc/self", e));
                }
                if let Err(e) = landlock_rules::restrict_self(fd) {
                    return Err(fail(b"landlock restrict_self", e));
                }
            }
            if let Some(filter) = self.syscall_filter
                && let Err(e) = syscall_filter::install(filter)
            {
                return Err(fail(b"seccomp filter", e));
            }
            // Mark rather than close: std's exec-error pipe must survive until exec.
            if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, CLOSE_RANGE_CLOEXEC) != 0 {
                let mut lim = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                let max = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
                    lim.rlim_cur.min(1 << 20) as i32
                } else {
                    1024
                };
                for fd in 3..max {
                    let flags = libc::fcntl(fd, libc::F_GETFD);
                    if flags >= 0 {
                        libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
                    }
                }
            }
            // Last: until exec the child holds the daemon's fds, perhaps up to the daemon's
            // raised limit; under the lower one, a step that opens a file could get EMFILE.
            if let Some(l) = self.open_files {
                let started_with = libc::rlimit {
                    rlim_cur: l.soft,
                    rlim_max: l.hard,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &started_with) != 0 {
                    return Err(fail(b"setrlimit nofile", errno()));
                }
            }
        }
        Ok(())
    }
}
