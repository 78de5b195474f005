//! Helpers shared by the `sandbox_*` integration tests: real interpreters, sinks in temp dirs,
//! bounded waits.
#![allow(dead_code)]

use elide_task_driver::sandbox::sink::{SinkRoots, open_sink};
use elide_task_driver::sandbox::{Intrinsics, IsolationSpec, Role};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

/// The real python interpreter behind the pyenv shim, and its install prefix.
pub fn python() -> (PathBuf, PathBuf) {
    let out = Command::new("python3")
        .args([
            "-c",
            "import sys;print(sys.executable);print(sys.base_prefix)",
        ])
        .output()
        .expect("python3 must be installed for the sandbox tests");
    assert!(out.status.success(), "python3 failed: {out:?}");
    let text = String::from_utf8(out.stdout).expect("utf8");
    let mut lines = text.lines();
    let exe = PathBuf::from(lines.next().expect("executable"));
    let prefix = PathBuf::from(lines.next().expect("prefix"));
    (exe, prefix)
}

/// A temp dir under /tmp (short paths) holding the working dir and the output files.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("esb")
            .tempdir_in("/tmp")
            .expect("tempdir");
        std::fs::create_dir(dir.path().join("work")).expect("mkdir work");
        Scratch { dir }
    }

    pub fn work(&self) -> PathBuf {
        self.dir.path().join("work")
    }

    pub fn out_path(&self) -> PathBuf {
        self.dir.path().join("stdout.log")
    }

    pub fn err_path(&self) -> PathBuf {
        self.dir.path().join("stderr.log")
    }

    /// A spec with everything allowed, output to stdout.log/stderr.log in the scratch dir.
    pub fn spec(&self) -> IsolationSpec {
        let roots = SinkRoots::new(vec![self.dir.path().to_path_buf()]);
        let stdout = open_sink(&self.out_path(), &roots, Duration::from_secs(1)).expect("stdout");
        let stderr = open_sink(&self.err_path(), &roots, Duration::from_secs(1)).expect("stderr");
        IsolationSpec {
            user: None,
            working_dir: self.work(),
            intrinsics: Intrinsics::ALL,
            role: Role::Execution,
            read_paths: Vec::new(),
            write_paths: Vec::new(),
            network_namespace: None,
            cgroup_procs: Vec::new(),
            cpus: None,
            merge_pages: false,
            stdout,
            stderr,
        }
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.out_path()).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.err_path()).unwrap_or_default()
    }
}

/// Waits for `child` with a generous deadline (loaded 2-core machine); kills it on timeout.
pub fn wait(child: &mut Child, limit: Duration) -> ExitStatus {
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status,
            Ok(None) => {}
            Err(e) => panic!("try_wait: {e}"),
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("child {} did not exit within {limit:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Spawns `cmd` configured by `spec`, waits, and returns the status and the scratch output.
pub fn run(
    scratch: &Scratch,
    spec: IsolationSpec,
    mut cmd: Command,
) -> (ExitStatus, String, String) {
    spec.apply(&mut cmd).expect("apply");
    let mut child = cmd.spawn().expect("spawn");
    let status = wait(&mut child, Duration::from_secs(60));
    (status, scratch.stdout(), scratch.stderr())
}

/// "exit 3" / "signal 9" for messages.
pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (_, Some(s)) => format!("signal {s}"),
        _ => "unknown".to_string(),
    }
}

/// Prints a skip notice (visible with `cargo test -- --nocapture` or `--show-output`); the
/// test then returns without asserting anything.
pub fn skip(test: &str, reason: &str) {
    println!("skipped: {test}: {reason}");
}

pub fn exists(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok()
}
