//! Pinning an execution to the CPU cores Nomad reserved for its task (`resources { cores = N }`).
//!
//! Nomad hands a task its reserved cores as `cpuset_cpus` ("2,3"; ranges such as "0-3" are
//! read too). The execution's threads are pinned to them with `sched_setaffinity`, the same way
//! on every launch path and whatever the node's cgroups. It is placement, not a fence: a
//! snippet may widen its own affinity again, and executions without reserved cores are not
//! kept off the reserved ones (Nomad's own executor does that with its cpuset cgroups).

use std::fmt;

/// The highest core number plus one that an affinity mask holds (`CPU_SETSIZE`).
const MAX_CPUS: u32 = libc::CPU_SETSIZE as u32;

/// Why a core list was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpusError {
    /// Not a list of core numbers and ranges.
    #[error("{text:?} is not a list of CPU cores like \"2,3\" or \"0-3\": {reason}")]
    Syntax {
        /// The list as given.
        text: String,
        /// What is wrong in it.
        reason: String,
    },
    /// A core this node does not have online.
    #[error("core {core} is not online on this node (online: {online})")]
    Offline {
        /// The core.
        core: u32,
        /// The cores online.
        online: Cpus,
    },
}

/// A set of CPU cores, kept sorted and without duplicates.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Cpus(Vec<u32>);

impl Cpus {
    /// Parses Nomad's `cpuset_cpus`: core numbers and inclusive ranges, comma-separated.
    /// `None` for an empty list (no reserved cores).
    pub fn parse(text: &str) -> Result<Option<Self>, CpusError> {
        let syntax = |reason: String| CpusError::Syntax {
            text: text.to_string(),
            reason,
        };
        let core = |s: &str| -> Result<u32, CpusError> {
            let s = s.trim();
            let not_a_number = || syntax(format!("{s:?} is not a core number"));
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(not_a_number());
            }
            let n: u32 = s.parse().map_err(|_| not_a_number())?;
            if n >= MAX_CPUS {
                return Err(syntax(format!(
                    "core {n} is beyond the {MAX_CPUS} a mask holds"
                )));
            }
            Ok(n)
        };
        if text.trim().is_empty() {
            return Ok(None);
        }
        let mut cores = Vec::new();
        for part in text.split(',') {
            match part.split_once('-') {
                Some((lo, hi)) => {
                    let (lo, hi) = (core(lo)?, core(hi)?);
                    if lo > hi {
                        return Err(syntax(format!("the range {lo}-{hi} runs backwards")));
                    }
                    cores.extend(lo..=hi);
                }
                None => cores.push(core(part)?),
            }
        }
        cores.sort_unstable();
        cores.dedup();
        Ok(Some(Self(cores)))
    }

    /// The cores online on this node (`/sys/devices/system/cpu/online`, in the kernel's list
    /// format).
    pub fn online() -> std::io::Result<Self> {
        let text = std::fs::read_to_string("/sys/devices/system/cpu/online")?;
        Self::parse(&text)
            .map_err(std::io::Error::other)?
            .ok_or_else(|| std::io::Error::other("no core is online"))
    }

    /// The cores this process may run on.
    pub fn of_this_process() -> std::io::Result<Self> {
        let mut set = empty_set();
        // SAFETY: sched_getaffinity fills the set we own, of the size we pass.
        let rc =
            unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self(
            // SAFETY: CPU_ISSET reads the set within its size.
            (0..MAX_CPUS)
                .filter(|&c| unsafe { libc::CPU_ISSET(c as usize, &set) })
                .collect(),
        ))
    }

    /// Checks that every core is online: the kernel pins a process to online cores only
    /// (`sched_setaffinity` drops the others, and fails when none is left). Whether the
    /// execution's cgroup allows a core too (a cpuset) shows when it is pinned. A node whose
    /// list cannot be read is not checked here.
    pub fn check_online(&self) -> Result<(), CpusError> {
        let Ok(online) = Self::online() else {
            return Ok(());
        };
        match self.0.iter().find(|c| !online.0.contains(c)) {
            Some(&core) => Err(CpusError::Offline { core, online }),
            None => Ok(()),
        }
    }

    /// The core numbers, ascending.
    pub fn cores(&self) -> &[u32] {
        &self.0
    }

    /// The set as `sched_setaffinity` takes it (built before a fork: the child must not
    /// allocate).
    pub fn to_set(&self) -> libc::cpu_set_t {
        let mut set = empty_set();
        for &c in &self.0 {
            // SAFETY: c < CPU_SETSIZE (checked at parse).
            unsafe { libc::CPU_SET(c as usize, &mut set) };
        }
        set
    }
}

/// Pins thread (or process) `tid` (0: the caller) to `set`. Async-signal-safe.
pub fn pin(tid: libc::pid_t, set: &libc::cpu_set_t) -> std::io::Result<()> {
    // SAFETY: sched_setaffinity reads the set we pass, of its size.
    let rc = unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), set) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Pins every thread of process `pid` to `cpus` (threads it starts later inherit the pinning
/// of the thread that starts them).
pub fn pin_process(pid: u32, cpus: &Cpus) -> std::io::Result<()> {
    let set = cpus.to_set();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let Some(tid) = entry?
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        match pin(tid, &set) {
            Ok(()) => {}
            // A thread that ended since the listing.
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn empty_set() -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is plain bits; all zeros is the empty set.
    unsafe { std::mem::zeroed() }
}

impl fmt::Display for Cpus {
    /// As the kernel lists them ("0-3,6").
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        let mut i = 0;
        while i < self.0.len() {
            let start = self.0[i];
            let mut end = start;
            while i + 1 < self.0.len() && self.0[i + 1] == end + 1 {
                i += 1;
                end = self.0[i];
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if start == end {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{end}")?;
            }
            i += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nomad_lists_and_ranges_parse_and_print_as_the_kernel_does() {
        assert_eq!(Cpus::parse("").unwrap(), None);
        assert_eq!(Cpus::parse(" ").unwrap(), None);
        let c = Cpus::parse("3,1, 2,7-9,1").unwrap().unwrap();
        assert_eq!(c.cores(), &[1, 2, 3, 7, 8, 9]);
        assert_eq!(c.to_string(), "1-3,7-9");
        for (bad, needle) in [
            ("1,x", "\"x\" is not a core number"),
            ("1,,2", "\"\" is not a core number"),
            ("4-2", "runs backwards"),
            ("-1", "\"\" is not a core number"),
            ("+1", "\"+1\" is not a core number"),
            ("1024", "beyond the 1024"),
        ] {
            let e = Cpus::parse(bad).unwrap_err().to_string();
            assert!(
                e.contains(needle) && e.contains(&format!("{bad:?}")),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn only_online_cores_are_taken() {
        let online = Cpus::online().expect("/sys/devices/system/cpu/online");
        online.check_online().expect("the online cores");
        let mine = Cpus::of_this_process().expect("sched_getaffinity");
        assert!(mine.cores().iter().all(|c| online.cores().contains(c)));
        let beyond = MAX_CPUS - 1;
        let e = Cpus::parse(&beyond.to_string())
            .unwrap()
            .unwrap()
            .check_online()
            .unwrap_err();
        assert_eq!(
            e,
            CpusError::Offline {
                core: beyond,
                online
            }
        );
    }

    /// A real thread pinned, as a node worker's are at its hand-over.
    #[test]
    fn every_thread_of_a_process_is_pinned() {
        let mine = Cpus::of_this_process().unwrap();
        let one = Cpus(vec![*mine.cores().last().unwrap()]);
        let mut child = std::process::Command::new("python3")
            .args([
                "-c",
                "import threading, time, sys\n\
                 t = threading.Thread(target=time.sleep, args=(30,), daemon=True); t.start()\n\
                 print('up', flush=True); sys.stdin.read()\n\
                 import os; print(sorted(os.sched_getaffinity(0)), sorted(os.sched_getaffinity(t.native_id)))",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3");
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        assert_eq!(line, "up\n");
        pin_process(child.id(), &one).expect("pinned");
        drop(child.stdin.take());
        line.clear();
        std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        let c = one.cores()[0];
        assert_eq!(line.trim(), format!("[{c}] [{c}]"));
        child.wait().unwrap();
    }
}
