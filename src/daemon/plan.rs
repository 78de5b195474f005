//! Turns a StartExecutionRequest into an [`ExecutionPlan`]: every field validated (errors name
//! the field), every name resolved (language → interpreter, user → ids), the code written to a
//! private per-execution directory. A launcher receives the plan as plain data and needs to
//! decide nothing.
//!
//! Inline code is written to a file rather than passed with `-c`/`-e`: the kernel caps one argv
//! string at 128 KiB (MAX_ARG_STRLEN) and code may be up to `max_code_bytes`.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::error::{DaemonError, DaemonResult};
use super::exec_limits::ExecLimits;
use super::runtime::{Backend, Language, RuntimeRegistry};
use super::tsstrip::StripCache;
use crate::proto::elide::daemon::v1alpha1 as pb;
use crate::sandbox::cgroup::MIN_MEMORY_BYTES;
use crate::sandbox::cpus::Cpus;
use crate::sandbox::user::{ResolvedUser, resolve_user};

/// The kernel-enforced capabilities of a session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntrinsicSet {
    /// The snippet sees the requested environment (else a minimal one).
    pub env: bool,
    /// The snippet may read/write beyond its working dir and runtime files.
    pub io: bool,
    /// The snippet shares the host (or given) network namespace (else loopback only).
    pub net: bool,
}

impl IntrinsicSet {
    /// Parses intrinsic names; errors name the field and the value.
    pub fn parse(names: &[String], field: &str) -> DaemonResult<Self> {
        let mut s = Self::default();
        for (i, n) in names.iter().enumerate() {
            match n.trim().to_ascii_lowercase().as_str() {
                "env" => s.env = true,
                "io" => s.io = true,
                "net" => s.net = true,
                _ => {
                    return Err(DaemonError::invalid(
                        format!("{field}[{i}]"),
                        format!("unknown intrinsic {n:?}; expected \"env\", \"io\" or \"net\""),
                    ));
                }
            }
        }
        Ok(s)
    }

    /// The names of the enabled intrinsics.
    pub fn names(&self) -> Vec<String> {
        let mut v = Vec::new();
        if self.env {
            v.push("env".to_string());
        }
        if self.io {
            v.push("io".to_string());
        }
        if self.net {
            v.push("net".to_string());
        }
        v
    }
}

/// Where one output stream goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SinkTarget {
    /// A FIFO, a regular file under an allowed root, or /dev/null (opened by the launcher).
    Path(PathBuf),
    /// Kept by the daemon for StreamOutput.
    Capture,
}

/// Resource limits after validation (None = unset).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanLimits {
    /// Memory limit in bytes (already tightened by the session cap).
    pub memory_bytes: Option<u64>,
    /// CPU shares.
    pub cpu_shares: Option<u64>,
    /// Max pids.
    pub pids: Option<u64>,
    /// The cores Nomad reserved for the task, which the execution is pinned to.
    pub cpus: Option<Cpus>,
    /// Wall-clock timeout.
    pub timeout: Option<Duration>,
}

/// A fully validated, resolved execution, ready for a launcher.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecutionPlan {
    /// Execution id.
    pub execution_id: String,
    /// Session id.
    pub session_id: String,
    /// Canonical language.
    pub language: Language,
    /// Backend that runs it.
    pub backend: Backend,
    /// argv; element 0 is the resolved interpreter.
    pub argv: Vec<OsString>,
    /// The complete environment of the child (nothing is inherited).
    pub env: Vec<(String, OsString)>,
    /// cwd of the child.
    pub working_dir: PathBuf,
    /// Daemon-owned private directory of this execution (code file; removed at the end).
    pub exec_dir: PathBuf,
    /// User to run as; None = the daemon's user.
    pub user: Option<ResolvedUser>,
    /// Kernel-enforced capabilities.
    pub intrinsics: IntrinsicSet,
    /// Readable paths without the `io` intrinsic (runtime files, script, extra paths).
    pub read_paths: Vec<PathBuf>,
    /// Writable paths without the `io` intrinsic, besides the working dir.
    pub write_paths: Vec<PathBuf>,
    /// Network namespace to join.
    pub network_namespace: Option<PathBuf>,
    /// Offer the execution's memory for same-page merging (its session asked, the kernel can).
    pub merge_pages: bool,
    /// Limits.
    pub limits: PlanLimits,
    /// stdout target.
    pub stdout: SinkTarget,
    /// stderr target.
    pub stderr: SinkTarget,
    /// Opaque client reference.
    pub client_ref: String,
}

/// What the planner needs from the daemon and the session.
pub struct PlanContext<'a> {
    /// Discovered runtimes.
    pub runtimes: &'a RuntimeRegistry,
    /// Languages the session enabled.
    pub session_languages: &'a [Language],
    /// Session intrinsics.
    pub intrinsics: IntrinsicSet,
    /// Session memory cap in bytes (None = none).
    pub session_memory_cap: Option<u64>,
    /// Whether the session's executions offer their memory for same-page merging.
    pub merge_pages: bool,
    /// Max inline code size.
    pub max_code_bytes: u64,
    /// Parent of per-execution dirs.
    pub run_dir: &'a Path,
    /// TypeScript stripper.
    pub strip_cache: &'a StripCache,
}

/// PATH given to snippets that do not see the task environment.
pub const MINIMAL_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

fn non_negative(field: &str, v: i64) -> DaemonResult<Option<u64>> {
    match v {
        0 => Ok(None),
        v if v < 0 => Err(DaemonError::invalid(
            field,
            format!("{v} is negative; use 0 for no limit"),
        )),
        v => Ok(Some(v as u64)),
    }
}

/// Converts a protobuf duration, refusing negative ones.
pub fn duration(field: &str, d: &prost_types::Duration) -> DaemonResult<Duration> {
    if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
        return Err(DaemonError::invalid(
            field,
            format!(
                "{}s {}ns is not a valid non-negative duration",
                d.seconds, d.nanos
            ),
        ));
    }
    Ok(Duration::new(d.seconds as u64, d.nanos as u32))
}

fn absolute(field: &str, value: &str) -> DaemonResult<PathBuf> {
    if value.contains('\0') {
        return Err(DaemonError::invalid(field, "contains a NUL byte"));
    }
    let p = PathBuf::from(value);
    if !p.is_absolute() {
        return Err(DaemonError::invalid(
            field,
            format!("{value:?} is relative; an absolute path is required"),
        ));
    }
    Ok(p)
}

fn sink(field: &str, s: &Option<pb::OutputSink>) -> DaemonResult<SinkTarget> {
    match s.as_ref().and_then(|s| s.kind.as_ref()) {
        None | Some(pb::output_sink::Kind::Capture(_)) => Ok(SinkTarget::Capture),
        Some(pb::output_sink::Kind::Path(p)) => {
            Ok(SinkTarget::Path(absolute(&format!("{field}.path"), p)?))
        }
    }
}

fn env_vars(req: &[pb::EnvVar]) -> DaemonResult<Vec<(String, OsString)>> {
    let mut out: Vec<(String, OsString)> = Vec::with_capacity(req.len());
    for (i, e) in req.iter().enumerate() {
        let key = String::from_utf8(e.key.clone()).map_err(|_| {
            DaemonError::invalid(
                format!("env[{i}].key"),
                format!("{:?} is not valid UTF-8", String::from_utf8_lossy(&e.key)),
            )
        })?;
        if key.is_empty() || key.contains('=') || key.contains('\0') {
            return Err(DaemonError::invalid(
                format!("env[{i}].key"),
                format!("{key:?} must be non-empty and contain neither '=' nor NUL"),
            ));
        }
        if e.value.contains(&0) {
            return Err(DaemonError::invalid(
                format!("env[{i}].value"),
                format!("value of {key:?} contains a NUL byte"),
            ));
        }
        let value = OsString::from_vec(e.value.clone());
        // A later duplicate wins, like in a shell.
        out.retain(|(k, _)| k != &key);
        out.push((key, value));
    }
    Ok(out)
}

/// Inline snippets up to this size count as brief to plan.
const BRIEF_CODE_BYTES: usize = 64 * 1024;

/// Whether planning `req` is brief enough for an async worker (see `blocking`): a snippet of
/// usual size is validated and written to the run dir (tmpfs) in a few syscalls, while a
/// script file is read and a large snippet stripped or written at a cost that grows with it.
pub fn is_brief(req: &pb::StartExecutionRequest) -> bool {
    req.path.is_empty() && req.code.len() <= BRIEF_CODE_BYTES
}

/// Validates `req` and writes the code file; blocking (user lookup, file I/O).
pub fn plan_execution(
    ctx: &PlanContext<'_>,
    execution_id: &str,
    req: &pb::StartExecutionRequest,
) -> DaemonResult<ExecutionPlan> {
    // Language.
    if req.language.trim().is_empty() {
        return Err(DaemonError::invalid(
            "language",
            "is empty; expected \"python\", \"javascript\", \"typescript\" (or py/js/ts)",
        ));
    }
    let language = Language::parse(&req.language).ok_or_else(|| {
        DaemonError::invalid(
            "language",
            format!(
                "unknown language {:?}; expected \"python\", \"javascript\", \"typescript\" (or py/js/ts)",
                req.language
            ),
        )
    })?;
    if !ctx.session_languages.contains(&language) {
        let enabled: Vec<&str> = ctx.session_languages.iter().map(|l| l.name()).collect();
        return Err(DaemonError::invalid(
            "language",
            format!(
                "{} is not enabled in session {:?} (enabled: {})",
                language.name(),
                req.session_id,
                enabled.join(", ")
            ),
        ));
    }
    let runtime = ctx
        .runtimes
        .get(language)
        .filter(|r| r.available)
        .ok_or_else(|| {
            let detail = ctx
                .runtimes
                .get(language)
                .map(|r| r.detail.clone())
                .unwrap_or_default();
            DaemonError::FailedPrecondition(format!(
                "language: {} is not available on this node: {detail}",
                language.name()
            ))
        })?;

    // Code or path.
    let has_code = !req.code.is_empty();
    let has_path = !req.path.is_empty();
    match (has_code, has_path) {
        (true, true) => {
            return Err(DaemonError::invalid(
                "code",
                "both code and path are set; give exactly one",
            ));
        }
        (false, false) => {
            return Err(DaemonError::invalid(
                "code",
                "code is empty and no path is given; give inline code or an absolute script path",
            ));
        }
        _ => {}
    }
    if req.code.len() as u64 > ctx.max_code_bytes {
        return Err(DaemonError::ResourceExhausted {
            field: "code".into(),
            message: format!(
                "{} bytes exceed the daemon's max_code_bytes of {}; pass a script path instead",
                req.code.len(),
                ctx.max_code_bytes
            ),
        });
    }
    let script_path = if has_path {
        let p = absolute("path", &req.path)?;
        match std::fs::metadata(&p) {
            Ok(m) if m.is_file() => Some(p),
            Ok(_) => {
                return Err(DaemonError::invalid(
                    "path",
                    format!("{} is not a regular file", p.display()),
                ));
            }
            Err(e) => {
                return Err(DaemonError::invalid(
                    "path",
                    format!("{}: {e}", p.display()),
                ));
            }
        }
    } else {
        None
    };

    // Args.
    for (i, a) in req.args.iter().enumerate() {
        if a.contains('\0') {
            return Err(DaemonError::invalid(
                format!("args[{i}]"),
                "contains a NUL byte",
            ));
        }
    }

    // Env.
    let requested_env = env_vars(&req.env)?;

    // Working dir.
    let working_dir = if req.working_dir.is_empty() {
        None
    } else {
        let p = absolute("working_dir", &req.working_dir)?;
        match std::fs::metadata(&p) {
            Ok(m) if m.is_dir() => Some(p),
            Ok(_) => {
                return Err(DaemonError::invalid(
                    "working_dir",
                    format!("{} is not a directory", p.display()),
                ));
            }
            Err(e) => {
                return Err(DaemonError::invalid(
                    "working_dir",
                    format!("{}: {e}", p.display()),
                ));
            }
        }
    };

    // User.
    let user = if req.user.is_empty() {
        None
    } else {
        Some(resolve_user(&req.user).map_err(|e| DaemonError::invalid("user", e.to_string()))?)
    };

    // Limits.
    let l = req.limits.clone().unwrap_or_default();
    let mut limits = PlanLimits {
        memory_bytes: non_negative("limits.memory_bytes", l.memory_bytes)?,
        cpu_shares: non_negative("limits.cpu_shares", l.cpu_shares)?,
        pids: non_negative("limits.pids", l.pids)?,
        cpus: match Cpus::parse(&l.cpuset_cpus) {
            Ok(Some(c)) => {
                // Nomad's own list, of a core this node lacks now: not bad input.
                c.check_online().map_err(|e| {
                    DaemonError::FailedPrecondition(format!("limits.cpuset_cpus: {e}"))
                })?;
                Some(c)
            }
            Ok(None) => None,
            Err(e) => return Err(DaemonError::invalid("limits.cpuset_cpus", e.to_string())),
        },
        timeout: match &l.timeout {
            Some(d) => Some(duration("limits.timeout", d)?).filter(|d| !d.is_zero()),
            None => None,
        },
    };
    if let Some(cap) = ctx.session_memory_cap {
        limits.memory_bytes = Some(limits.memory_bytes.map_or(cap, |m| m.min(cap)));
    }
    // Refused here rather than when the cgroup is made, so every launch path (cold, zygote,
    // node worker) answers the same and no worker is taken for nothing.
    if let Some(m) = limits.memory_bytes
        && m < MIN_MEMORY_BYTES
    {
        let requested = u64::try_from(l.memory_bytes).ok() == Some(m);
        return Err(DaemonError::invalid(
            if requested {
                "limits.memory_bytes"
            } else {
                "session config memory_limit_mb"
            },
            format!(
                "{m} bytes is below the {} MiB an interpreter needs to start",
                MIN_MEMORY_BYTES >> 20
            ),
        ));
    }

    // Sinks, netns, extra paths.
    let stdout = sink("stdout", &req.stdout)?;
    let stderr = sink("stderr", &req.stderr)?;
    let network_namespace = if req.network_namespace.is_empty() {
        None
    } else {
        let p = absolute("network_namespace", &req.network_namespace)?;
        if !p.exists() {
            return Err(DaemonError::invalid(
                "network_namespace",
                format!("{} does not exist", p.display()),
            ));
        }
        Some(p)
    };
    let mut read_paths = runtime.read_paths.clone();
    for (i, p) in req.extra_read_paths.iter().enumerate() {
        read_paths.push(absolute(&format!("extra_read_paths[{i}]"), p)?);
    }
    let mut write_paths = Vec::new();
    for (i, p) in req.extra_write_paths.iter().enumerate() {
        write_paths.push(absolute(&format!("extra_write_paths[{i}]"), p)?);
    }

    // TypeScript is stripped before anything touches the disk, so syntax errors cost nothing.
    let source: Option<std::sync::Arc<str>> = match (language, &script_path) {
        (Language::TypeScript, Some(p)) if runtime.backend == Backend::Native => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| DaemonError::invalid("path", format!("{}: {e}", p.display())))?;
            Some(
                ctx.strip_cache
                    .strip(&text, &p.to_string_lossy())
                    .map_err(|e| DaemonError::invalid("path", e.to_string()))?,
            )
        }
        (Language::TypeScript, None) if runtime.backend == Backend::Native => Some(
            ctx.strip_cache
                .strip(&req.code, "snippet.ts")
                .map_err(|e| DaemonError::invalid("code", e.to_string()))?,
        ),
        (_, None) => Some(req.code.as_str().into()),
        (_, Some(_)) => None,
    };

    // Private per-execution dir, owned by the target user so the snippet can read its code.
    let exec_dir = ctx.run_dir.join(execution_id);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&exec_dir)
        .map_err(|e| DaemonError::Internal(format!("creating {}: {e}", exec_dir.display())))?;
    let cleanup_on_err = |e: DaemonError| {
        let _ = std::fs::remove_dir_all(&exec_dir);
        e
    };
    let script = match source {
        Some(src) => {
            let ext = if runtime.backend == Backend::Elide && language == Language::TypeScript {
                "ts"
            } else {
                language.file_extension()
            };
            let file = exec_dir.join(format!("main.{ext}"));
            write_private(&file, src.as_bytes()).map_err(cleanup_on_err)?;
            file
        }
        None => script_path.clone().unwrap_or_default(),
    };
    if let Some(u) = &user {
        let chown = |p: &Path| {
            nix::unistd::chown(p, Some(u.uid.into()), Some(u.gid.into()))
                .map_err(|e| DaemonError::Internal(format!("chown {}: {e}", p.display())))
        };
        chown(&exec_dir).map_err(cleanup_on_err)?;
        if script.starts_with(&exec_dir) {
            chown(&script).map_err(cleanup_on_err)?;
        }
    }
    if let Some(u) = &user {
        // Fail with the reason now rather than with EACCES from exec in the child.
        for (what, p) in [("interpreter", &runtime.command), ("script", &script)] {
            if let Err(reason) = accessible_by(p, u, what == "interpreter") {
                let _ = std::fs::remove_dir_all(&exec_dir);
                return Err(DaemonError::invalid(
                    "user",
                    format!(
                        "user {:?} (uid {}) cannot use the {what} {}: {reason}",
                        u.spec,
                        u.uid,
                        p.display()
                    ),
                ));
            }
        }
    }
    read_paths.push(script.clone());

    let working_dir = working_dir.unwrap_or_else(|| exec_dir.clone());

    // Environment: exactly the requested one with `env`; a minimal one without.
    let env = if ctx.intrinsics.env {
        requested_env
    } else {
        let home = user
            .as_ref()
            .and_then(|u| u.home.clone())
            .unwrap_or_else(|| working_dir.clone());
        vec![
            ("PATH".to_string(), OsString::from(MINIMAL_PATH)),
            ("HOME".to_string(), home.into_os_string()),
            ("LANG".to_string(), OsString::from("C.UTF-8")),
        ]
    };

    let argv = runtime.argv(&script, &req.args);
    // Pooled runtimes do not exec, but must refuse what a cold start's exec would.
    let added = launcher_additions(&env, ctx.intrinsics, &working_dir, user.as_ref());
    let launched = env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_os_str()))
        .chain(added.iter().copied());
    ExecLimits::of_children()
        .check(&argv, argv.len() - req.args.len(), launched)
        .map_err(cleanup_on_err)?;

    Ok(ExecutionPlan {
        execution_id: execution_id.to_string(),
        session_id: req.session_id.clone(),
        language,
        backend: runtime.backend.clone(),
        argv,
        env,
        working_dir,
        exec_dir,
        user,
        intrinsics: ctx.intrinsics,
        read_paths,
        write_paths,
        network_namespace,
        merge_pages: ctx.merge_pages,
        limits,
        stdout,
        stderr,
        client_ref: req.client_ref.clone(),
    })
}

/// What the launchers add to `env` (`IsolationSpec::apply`, `pool::final_env`): USER and
/// LOGNAME for a named user without `env` (`IsolationSpec::base_env`, whose other variables
/// `env` already holds then), and TMPDIR in the working dir without `io`.
fn launcher_additions<'a>(
    env: &[(String, OsString)],
    intrinsics: IntrinsicSet,
    working_dir: &'a Path,
    user: Option<&'a ResolvedUser>,
) -> Vec<(&'static str, &'a OsStr)> {
    let mut added = Vec::new();
    if let Some(name) = user
        .and_then(|u| u.name.as_deref())
        .filter(|_| !intrinsics.env)
    {
        added.push(("USER", OsStr::new(name)));
        added.push(("LOGNAME", OsStr::new(name)));
    }
    if !intrinsics.io && env.iter().all(|(k, _)| k != "TMPDIR") {
        added.push(("TMPDIR", working_dir.as_os_str()));
    }
    added
}

fn write_private(path: &Path, bytes: &[u8]) -> DaemonResult<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| DaemonError::Internal(format!("writing {}: {e}", path.display())))?;
    f.write_all(bytes)
        .map_err(|e| DaemonError::Internal(format!("writing {}: {e}", path.display())))
}

/// Whether `user` may reach `path` (search permission on every ancestor) and read it (and
/// execute it when `exec`), by the classic owner/group/other mode bits. Root passes.
fn accessible_by(path: &Path, user: &ResolvedUser, exec: bool) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    if user.uid == 0 {
        return Ok(());
    }
    let allows = |m: &std::fs::Metadata, bit: u32| {
        let mode = m.mode();
        if m.uid() == user.uid {
            mode & (bit << 6) != 0
        } else if m.gid() == user.gid || user.groups.contains(&m.gid()) {
            mode & (bit << 3) != 0
        } else {
            mode & bit != 0
        }
    };
    let mut ancestors: Vec<&Path> = path.ancestors().skip(1).collect();
    ancestors.reverse();
    for dir in ancestors {
        let m = std::fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        if !allows(&m, 0o1) {
            return Err(format!(
                "no search permission on directory {}",
                dir.display()
            ));
        }
    }
    let m = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !allows(&m, 0o4) {
        return Err("no read permission".to_string());
    }
    if exec && !allows(&m, 0o1) {
        return Err("no execute permission".to_string());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_keys_are_validated_and_later_duplicates_win() {
        let e = |k: &[u8], v: &[u8]| pb::EnvVar {
            key: k.to_vec(),
            value: v.to_vec(),
        };
        let got = env_vars(&[e(b"A", b"1"), e(b"B", b"\xff"), e(b"A", b"2")]).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[1], ("A".to_string(), OsString::from("2")));
        assert_eq!(got[0].1.as_encoded_bytes(), b"\xff");
        let err = env_vars(&[e(b"OK", b""), e(b"\xc3\x28", b"x")]).unwrap_err();
        assert!(err.to_string().starts_with("env[1].key"), "{err}");
        let err = env_vars(&[e(b"", b"x")]).unwrap_err();
        assert!(err.to_string().starts_with("env[0].key"), "{err}");
        let err = env_vars(&[e(b"K", b"a\0b")]).unwrap_err();
        assert!(err.to_string().starts_with("env[0].value"), "{err}");
    }

    /// What the size check counts is what a cold launcher execs: TMPDIR joins the variables
    /// without `io`, unless the task sets its own; USER and LOGNAME without `env`, for a user
    /// with a name (as `IsolationSpec::base_env` adds them).
    #[test]
    fn the_environment_checked_is_the_one_launched() {
        let env_as_launched = |env: &[(String, OsString)], i, wd, user| {
            let mut launched = env.to_vec();
            launched.extend(
                launcher_additions(env, i, wd, user)
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v.to_os_string())),
            );
            launched
        };
        let env = vec![("A".to_string(), OsString::from("1"))];
        let wd = Path::new("/run/elide/exec/e-1");
        let none = IntrinsicSet::default();
        let env_only = IntrinsicSet {
            env: true,
            ..IntrinsicSet::default()
        };
        let all = IntrinsicSet {
            env: true,
            io: true,
            net: true,
        };
        let tmpdir = ("TMPDIR".to_string(), wd.as_os_str().to_os_string());
        assert_eq!(
            env_as_launched(&env, env_only, wd, None),
            [env[0].clone(), tmpdir.clone()]
        );
        assert_eq!(env_as_launched(&env, all, wd, None), env.as_slice());
        let own = vec![("TMPDIR".to_string(), OsString::from("/x"))];
        assert_eq!(env_as_launched(&own, env_only, wd, None), own.as_slice());

        let nobody = resolve_user("nobody").expect("nobody");
        let named = |v: &str| (v.to_string(), OsString::from("nobody"));
        assert_eq!(
            env_as_launched(&env, none, wd, Some(&nobody)),
            [env[0].clone(), named("USER"), named("LOGNAME"), tmpdir]
        );
        assert_eq!(
            env_as_launched(&env, all, wd, Some(&nobody)),
            env.as_slice()
        );
    }

    #[test]
    fn limits_and_durations_refuse_negative_values() {
        assert_eq!(non_negative("f", 0).unwrap(), None);
        assert_eq!(non_negative("f", 5).unwrap(), Some(5));
        assert!(
            non_negative("limits.pids", -1)
                .unwrap_err()
                .to_string()
                .contains("limits.pids")
        );
        let d = prost_types::Duration {
            seconds: 1,
            nanos: 500,
        };
        assert_eq!(duration("t", &d).unwrap(), Duration::new(1, 500));
        let bad = prost_types::Duration {
            seconds: 0,
            nanos: -1,
        };
        assert!(
            duration("grace", &bad)
                .unwrap_err()
                .to_string()
                .contains("grace")
        );
    }

    #[test]
    fn intrinsics_parse_names_and_reject_unknown() {
        let s = IntrinsicSet::parse(&["ENV".into(), "net".into()], "x").unwrap();
        assert_eq!((s.env, s.io, s.net), (true, false, true));
        assert_eq!(s.names(), vec!["env", "net"]);
        let err = IntrinsicSet::parse(&["io".into(), "disk".into()], "cfg").unwrap_err();
        assert!(err.to_string().contains("cfg[1]") && err.to_string().contains("disk"));
    }

    #[test]
    fn access_check_follows_mode_bits() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("x");
        std::fs::write(&f, "").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let other = ResolvedUser {
            spec: "12345".into(),
            uid: 12345,
            gid: 12345,
            groups: vec![],
            home: None,
            name: None,
        };
        let err = accessible_by(&f, &other, false).unwrap_err();
        assert!(err.contains("search permission"), "{err}");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        accessible_by(&f, &other, false).unwrap();
        assert!(
            accessible_by(&f, &other, true)
                .unwrap_err()
                .contains("execute")
        );
    }
}
