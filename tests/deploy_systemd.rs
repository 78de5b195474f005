//! `deploy/systemd/elide-daemon.service`: systemd accepts the unit, and the daemon does what
//! the unit's comments promise when run the way the unit says: its command line, its open-file
//! limits (snippets keep the soft one, the daemon raises its own), and on stop SIGTERM to the
//! daemon alone (KillMode=process, so systemd kills nothing else), after which every process it
//! started (executions, zygotes, its reaper) ends within TimeoutStopSec. (OOMScoreAdjust:
//! lowering a score needs CAP_SYS_RESOURCE, which this harness lacks; `pool_lifecycle` tests
//! that the zygote takes the daemon's score and executions do not.)

#[path = "daemon_support/mod.rs"]
mod daemon_support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use daemon_support::*;

const UNIT: &str = include_str!("../deploy/systemd/elide-daemon.service");
/// Where the unit expects the daemon to be installed.
const INSTALLED_AT: &str = "/usr/local/bin/elide-daemon";

/// The value of `key` in the unit's `[Service]` section (the last assignment wins, as in
/// systemd).
fn service_setting(key: &str) -> &'static str {
    let mut section = "";
    let mut value = None;
    for line in UNIT.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line;
        } else if section == "[Service]"
            && let Some((k, v)) = line.split_once('=')
            && k.trim() == key
        {
            value = Some(v.trim());
        }
    }
    value.unwrap_or_else(|| panic!("the unit sets no {key}="))
}

/// The unit with its `ExecStart` pointing at the daemon this build made.
fn unit_for_this_build() -> String {
    assert!(
        UNIT.contains(INSTALLED_AT),
        "the unit does not start {INSTALLED_AT}"
    );
    UNIT.replace(INSTALLED_AT, env!("CARGO_BIN_EXE_elide-daemon"))
}

#[test]
fn systemd_accepts_the_unit_without_a_warning() {
    let dir = tempfile::tempdir().expect("tempdir");
    let unit = dir.path().join("elide-daemon.service");
    std::fs::write(&unit, unit_for_this_build()).expect("write unit");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .expect("running systemd-analyze (Debian/Ubuntu package: systemd)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}: {stderr}", out.status);
    assert_eq!(stderr, "", "systemd-analyze verify warned");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_run_as_the_unit_says_serves_and_ends_its_executions_on_stop() {
    let exec: Vec<&str> = service_setting("ExecStart").split_whitespace().collect();
    assert_eq!(exec[..2], [INSTALLED_AT, "serve"], "ExecStart");
    let (soft, hard) = service_setting("LimitNOFILE")
        .split_once(':')
        .map(|(s, h)| {
            (
                s.parse::<u64>().expect("soft"),
                h.parse::<u64>().expect("hard"),
            )
        })
        .expect("LimitNOFILE=SOFT:HARD");
    assert_eq!(service_setting("KillMode"), "process");
    let stop_timeout =
        humantime::parse_duration(service_setting("TimeoutStopSec")).expect("TimeoutStopSec");

    // systemd may raise a hard limit; this harness cannot without CAP_SYS_RESOURCE (which
    // containers drop), so the daemon gets the lower of the unit's and the harness's.
    let mut ours = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut ours) },
        0
    );
    let hard = hard.min(ours.rlim_max);
    let d = TestDaemon::start_with_args_and_open_file_limits(&exec[2..], soft, Some(hard)).await;
    let log = d.log();
    assert!(log.contains("raised the open-file limit"), "{log}");
    assert!(
        !log.contains("the open-file limit allows"),
        "the unit's hard limit is called low: {log}"
    );

    let mut c = d.client().await;
    let report = "print([l.split()[3] for l in open('/proc/self/limits') if l.startswith('Max open files')][0])\n";
    for pool in [0, 2] {
        let s = session_with_pool(&mut c, &["io"], pool).await;
        let (r, out, err) = run(&mut c, code_req(&s, "python", report)).await;
        assert_eq!(
            (r.exit_code, out, err),
            (0, format!("{soft}\n"), String::new()),
            "pool {pool}"
        );
    }

    // A snippet that ignores SIGTERM: systemd signals only the daemon, which must end it.
    let s = session(&mut c, &["io"]).await;
    let ready = d.path("ready");
    let stubborn = format!(
        "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nopen({:?}, 'w').close()\ntime.sleep(600)\n",
        ready.display()
    );
    let e = c
        .start_execution(code_req(&s, "python", &stubborn))
        .await
        .expect("start")
        .into_inner();
    eventually("the stubborn snippet is running", || {
        Path::new(&ready).exists()
    })
    .await;
    assert!(alive(e.pid), "the stubborn snippet is not running");

    // The reaper, the python zygote of the pooled session and its spares, the execution.
    let daemon = d.pid();
    let started: Vec<u32> = all_descendants(daemon)
        .into_iter()
        .map(|(p, _, _)| p)
        .collect();
    assert!(
        started.contains(&e.pid) && started.len() >= 3,
        "{started:?}"
    );
    d.terminate();
    let t = Instant::now();
    loop {
        let left: Vec<u32> = std::iter::once(daemon)
            .chain(started.iter().copied())
            .filter(|p| alive(*p))
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            t.elapsed() < stop_timeout,
            "{} after SIGTERM to the daemon (TimeoutStopSec={stop_timeout:?}), still running: \
             {left:?} (the daemon is {daemon}, the execution {})\n{}",
            humantime::format_duration(t.elapsed()),
            e.pid,
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
