//! Output sinks: real FIFOs (with and without a reader), files, symlinks, directories, sockets.

use elide_task_driver::sandbox::sink::{SinkError, SinkRoots, open_sink};
use nix::sys::stat::Mode;
use nix::unistd::mkfifo;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("esk")
        .tempdir_in("/tmp")
        .expect("tempdir")
}

fn refused(path: &Path, roots: &[PathBuf]) -> String {
    match open_sink(
        path,
        &SinkRoots::new(roots.to_vec()),
        Duration::from_millis(100),
    ) {
        Ok(_) => panic!("{path:?} must be refused"),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("{path:?}")),
                "error must name the path: {msg}"
            );
            msg
        }
    }
}

/// A reader that opens `fifo` (after `delay`) and returns all it reads until EOF.
fn spawn_reader(fifo: &Path, delay: Duration) -> std::thread::JoinHandle<String> {
    let fifo = fifo.to_path_buf();
    std::thread::spawn(move || {
        std::thread::sleep(delay);
        let mut s = String::new();
        std::fs::File::open(&fifo)
            .expect("open reader")
            .read_to_string(&mut s)
            .expect("read");
        s
    })
}

fn is_nonblocking(fd: &std::os::fd::OwnedFd) -> bool {
    // SAFETY: F_GETFL on an fd we own.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    assert!(flags >= 0);
    flags & libc::O_NONBLOCK != 0
}

#[test]
fn fifo_with_reader_opens_blocking_and_delivers_bytes() {
    let d = tmp();
    let fifo = d.path().join("out.fifo");
    mkfifo(&fifo, Mode::from_bits_truncate(0o600)).expect("mkfifo");
    let reader = spawn_reader(&fifo, Duration::ZERO);
    let fd = open_sink(&fifo, &SinkRoots::none(), Duration::from_secs(30)).expect("open fifo");
    assert!(!is_nonblocking(&fd), "the child must get a blocking fd");
    let mut w = std::fs::File::from(fd);
    w.write_all(b"hello fifo\n").expect("write");
    drop(w);
    assert_eq!(reader.join().expect("reader"), "hello fifo\n");
}

#[test]
fn fifo_reader_arriving_late_is_waited_for() {
    let d = tmp();
    let fifo = d.path().join("late.fifo");
    mkfifo(&fifo, Mode::from_bits_truncate(0o600)).expect("mkfifo");
    // Attaches only once the writer has been retrying for a while.
    let reader = spawn_reader(&fifo, Duration::from_millis(200));
    let fd = open_sink(&fifo, &SinkRoots::none(), Duration::from_secs(60)).expect("open fifo");
    let mut w = std::fs::File::from(fd);
    w.write_all(b"late\n").expect("write");
    drop(w);
    assert_eq!(reader.join().expect("reader"), "late\n");
}

#[test]
fn fifo_without_reader_fails_after_deadline_naming_it() {
    let d = tmp();
    let fifo = d.path().join("noreader.fifo");
    mkfifo(&fifo, Mode::from_bits_truncate(0o600)).expect("mkfifo");
    let start = Instant::now();
    let err =
        open_sink(&fifo, &SinkRoots::none(), Duration::from_millis(300)).expect_err("no reader");
    assert!(start.elapsed() >= Duration::from_millis(300));
    assert!(matches!(err, SinkError::NoReader { .. }), "{err}");
    assert!(err.to_string().contains("noreader.fifo"), "{err}");
}

#[test]
fn regular_file_under_root_is_created_and_appended() {
    let d = tmp();
    let roots = SinkRoots::new(vec![d.path().to_path_buf()]);
    let path = d.path().join("sub").join("out.log");
    std::fs::create_dir(d.path().join("sub")).expect("mkdir");
    for line in ["one\n", "two\n"] {
        let fd = open_sink(&path, &roots, Duration::from_secs(1)).expect("open file");
        std::fs::File::from(fd)
            .write_all(line.as_bytes())
            .expect("write");
    }
    assert_eq!(std::fs::read_to_string(&path).expect("read"), "one\ntwo\n");
}

#[test]
fn dev_null_is_allowed() {
    let fd = open_sink(
        Path::new("/dev/null"),
        &SinkRoots::none(),
        Duration::from_secs(1),
    )
    .expect("null");
    std::fs::File::from(fd)
        .write_all(b"discarded")
        .expect("write");
}

#[test]
fn files_outside_roots_or_without_roots_are_refused() {
    let d = tmp();
    let other = tmp();
    let roots = vec![d.path().to_path_buf()];
    let outside = other.path().join("x.log");
    let msg = refused(&outside, &roots);
    assert!(msg.contains("not under an allowed sink root"), "{msg}");
    assert!(
        !outside.exists(),
        "nothing may be created outside the roots"
    );
    let msg = refused(&d.path().join("y.log"), &[]);
    assert!(msg.contains("none is configured"), "{msg}");
    refused(Path::new("/etc/elide-should-not-exist.log"), &roots);
    refused(Path::new("relative.log"), &roots);
    refused(&d.path().join("..").join("escape.log"), &roots);
    // The root itself is a directory, not a file under it.
    refused(d.path(), &roots);
}

#[test]
fn symlinks_are_refused_even_inside_the_root() {
    let d = tmp();
    let roots = vec![d.path().to_path_buf()];
    let target = d.path().join("real.log");
    std::fs::write(&target, "").expect("write");
    let link = d.path().join("link.log");
    symlink(&target, &link).expect("symlink");
    let msg = refused(&link, &roots);
    assert!(msg.contains("symlink"), "{msg}");
    // A symlink to a file outside the root.
    let out = d.path().join("passwd.log");
    symlink("/etc/passwd", &out).expect("symlink");
    refused(&out, &roots);
    // A symlinked directory that escapes the root.
    let other = tmp();
    let escape = d.path().join("escape");
    symlink(other.path(), &escape).expect("symlink dir");
    let msg = refused(&escape.join("x.log"), &roots);
    assert!(msg.contains("not under an allowed sink root"), "{msg}");
    assert!(!other.path().join("x.log").exists());
    // A symlink to a FIFO is refused too.
    let fifo = d.path().join("f.fifo");
    mkfifo(&fifo, Mode::from_bits_truncate(0o600)).expect("mkfifo");
    let fl = d.path().join("fifo-link");
    symlink(&fifo, &fl).expect("symlink");
    refused(&fl, &roots);
}

#[test]
fn directories_sockets_devices_and_hard_links_are_refused() {
    let d = tmp();
    let roots = vec![d.path().to_path_buf()];
    let dir = d.path().join("adir");
    std::fs::create_dir(&dir).expect("mkdir");
    assert!(refused(&dir, &roots).contains("directory"));
    let sock = d.path().join("s.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
    assert!(refused(&sock, &roots).contains("socket"));
    assert!(refused(Path::new("/dev/zero"), &roots).contains("device"));
    let a = d.path().join("a.log");
    std::fs::write(&a, "").expect("write");
    std::fs::hard_link(&a, d.path().join("b.log")).expect("link");
    assert!(refused(&a, &roots).contains("hard link"));
}

#[test]
fn fifos_outside_configured_roots_are_refused() {
    let root = tmp();
    let elsewhere = tmp();
    let roots = vec![root.path().to_path_buf()];
    let outside = elsewhere.path().join("sys.fifo");
    mkfifo(&outside, Mode::from_bits_truncate(0o600)).expect("mkfifo");
    let msg = refused(&outside, &roots);
    assert!(msg.contains("not under an allowed sink root"), "{msg}");
    // The same FIFO reached through a symlinked directory inside the root is refused too.
    let escape = root.path().join("escape");
    symlink(elsewhere.path(), &escape).expect("symlink");
    refused(&escape.join("sys.fifo"), &roots);
    // Inside the root it opens (a reader is attached so the open succeeds at once).
    let inside = root.path().join("ok.fifo");
    mkfifo(&inside, Mode::from_bits_truncate(0o600)).expect("mkfifo");
    let reader = spawn_reader(&inside, Duration::ZERO);
    let fd =
        open_sink(&inside, &SinkRoots::new(roots), Duration::from_secs(30)).expect("inside root");
    std::fs::File::from(fd).write_all(b"in\n").expect("write");
    assert_eq!(reader.join().expect("reader"), "in\n");
}

/// A FIFO under a root opens whichever way its path is written: through the root's real path
/// (one `openat2` beneath it), through a symlink to the root, through a symlinked directory
/// that stays inside; and it waits for a late reader either way.
#[test]
fn fifos_under_a_root_open_by_real_and_symlinked_paths() {
    let base = tmp();
    let real = base.path().join("real");
    std::fs::create_dir_all(real.join("alloc").join("logs")).expect("mkdir");
    let via = base.path().join("via");
    symlink(&real, &via).expect("symlink root");
    // Absolute and relative links to a directory inside the root.
    symlink(real.join("alloc"), real.join("abs-link")).expect("symlink");
    symlink("alloc", real.join("rel-link")).expect("symlink");
    let fifo = real.join("alloc").join("logs").join("t.stdout.fifo");
    mkfifo(&fifo, Mode::from_bits_truncate(0o600)).expect("mkfifo");
    for (root, path, late) in [
        (&real, fifo.clone(), false),
        (&real, fifo.clone(), true),
        (&via, via.join("alloc/logs/t.stdout.fifo"), false),
        (&real, via.join("alloc/logs/t.stdout.fifo"), true),
        (&via, fifo.clone(), false),
        (&real, real.join("abs-link/logs/t.stdout.fifo"), false),
        (&real, real.join("rel-link/logs/t.stdout.fifo"), true),
    ] {
        let delay = if late {
            Duration::from_millis(50)
        } else {
            Duration::ZERO
        };
        let reader = spawn_reader(&fifo, delay);
        let roots = SinkRoots::new(vec![root.clone()]);
        let fd = open_sink(&path, &roots, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("{path:?} under root {root:?}: {e}"));
        assert!(!is_nonblocking(&fd), "the child must get a blocking fd");
        std::fs::File::from(fd).write_all(b"x\n").expect("write");
        assert_eq!(reader.join().expect("reader"), "x\n", "{path:?}");
    }
}

/// A root that does not exist when the roots are set up (Nomad makes its data dir on first
/// run) counts once it does.
#[test]
fn a_root_created_later_is_found() {
    let base = tmp();
    let root = base.path().join("later");
    let roots = SinkRoots::new(vec![root.clone()]);
    std::fs::create_dir(&root).expect("mkdir");
    let fifo = root.join("o.fifo");
    mkfifo(&fifo, Mode::from_bits_truncate(0o600)).expect("mkfifo");
    let reader = spawn_reader(&fifo, Duration::ZERO);
    let fd = open_sink(&fifo, &roots, Duration::from_secs(30)).expect("root made late");
    std::fs::File::from(fd)
        .write_all(b"late root\n")
        .expect("write");
    assert_eq!(reader.join().expect("reader"), "late root\n");
    let file = root.join("f.log");
    let fd = open_sink(&file, &roots, Duration::from_secs(1)).expect("file under late root");
    drop(fd);
    assert!(file.exists());
}
