//! What `/proc/<pid>/stat` says of a process: its state and its parent.

/// The fields of `/proc/<pid>/stat` this crate reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// `R`, `S`, `D`, `T`, `Z` (exited, not yet reaped), `X`...
    pub state: char,
    /// The parent's pid.
    pub ppid: u32,
}

impl ProcStat {
    /// The process's fields, or None once it is gone (reaped) or unreadable.
    pub fn of(pid: u32) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name may hold spaces and parentheses: the fields follow the last ')'.
        let (_, rest) = stat.rsplit_once(')')?;
        let mut fields = rest.split_whitespace();
        let state = fields.next()?.chars().next()?;
        let ppid = fields.next()?.parse().ok()?;
        Some(Self { state, ppid })
    }

    /// Whether it has not exited yet (a zombie has, though its parent did not reap it).
    pub fn running(&self) -> bool {
        !matches!(self.state, 'Z' | 'X' | 'x')
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_runs_then_is_a_zombie_until_reaped() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "read _"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("sh");
        let pid = child.id();
        let st = ProcStat::of(pid).expect("a running child");
        assert!(st.running(), "{st:?}");
        assert_eq!(st.ppid, std::process::id());
        // EOF on its stdin ends it; unreaped, it stays a zombie.
        drop(child.stdin.take());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while ProcStat::of(pid).is_some_and(|s| s.running()) {
            assert!(
                std::time::Instant::now() < deadline,
                "the child never ended"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(ProcStat::of(pid).map(|s| s.state), Some('Z'));
        child.wait().expect("wait");
        assert_eq!(ProcStat::of(pid), None);
    }
}
