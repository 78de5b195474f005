//! The kernel's limits on the argument and environment strings of a new process, checked when
//! an execution is planned. A cold start that exceeds them fails in `execve` (E2BIG), after the
//! daemon has prepared everything, with an error that names neither field; a pooled one does
//! not exec and would run. Checking the plan's final argv and environment makes both refuse the
//! same request, as a bad argument that names the variable or argument at fault.
//!
//! The kernel (`fs/exec.c`) allows each string, its NUL included, at most 32 pages
//! (`MAX_ARG_STRLEN`), and all of them together (the program's path, argv, envp) with a pointer
//! each at most a quarter of the stack limit, but no more than 6 MiB and no less than
//! `ARG_MAX` (128 KiB, whatever the page size).

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::sync::OnceLock;

use super::error::{DaemonError, DaemonResult};

/// The kernel's `_STK_LIM`: three quarters of it cap the total whatever the stack limit.
const KERNEL_STACK_LIMIT: u64 = 8 << 20;
/// The kernel's `ARG_MAX` (`linux/limits.h`): the least total any stack limit allows.
const ARG_MAX: u64 = 131_072;

/// The limits a new process's strings must fit in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecLimits {
    /// Bytes of one string, its NUL included.
    pub one_string: usize,
    /// Bytes of all strings (NULs included) and their pointers together.
    pub total: usize,
}

impl ExecLimits {
    /// The limits for a process with this soft stack limit (`None`: unlimited) on a machine
    /// with pages of `page_size` bytes.
    pub fn for_stack(stack_soft_limit: Option<u64>, page_size: usize) -> Self {
        let quarter = stack_soft_limit.map_or(u64::MAX, |s| s / 4);
        let total = (KERNEL_STACK_LIMIT / 4 * 3).min(quarter).max(ARG_MAX);
        Self {
            one_string: 32 * page_size,
            total: usize::try_from(total).unwrap_or(usize::MAX),
        }
    }

    /// The limits for the processes this daemon starts: they inherit its stack limit, which
    /// does not change while it runs.
    pub fn of_children() -> Self {
        static LIMITS: OnceLock<ExecLimits> = OnceLock::new();
        *LIMITS.get_or_init(|| {
            // SAFETY: sysconf has no preconditions.
            let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
            let page = usize::try_from(page).unwrap_or(4096);
            let stack = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_STACK)
                .ok()
                .map(|(soft, _)| soft)
                .filter(|s| *s != libc::RLIM_INFINITY);
            Self::for_stack(stack, page)
        })
    }

    /// Checks the strings `execve` would copy: `argv` (element 0 is the program, also copied
    /// as the path to run; user arguments begin at `first_arg`) and `env`.
    pub fn check<'a>(
        &self,
        argv: &[OsString],
        first_arg: usize,
        env: impl IntoIterator<Item = (&'a str, &'a OsStr)>,
    ) -> DaemonResult<()> {
        for (i, a) in argv.iter().enumerate() {
            let len = a.len() + 1;
            if len > self.one_string {
                let field = match i.checked_sub(first_arg) {
                    Some(n) => format!("args[{n}]"),
                    None => "path".to_string(),
                };
                return Err(DaemonError::invalid(
                    field,
                    format!(
                        "{} is {len} bytes, more than the {} the kernel allows one argument of \
                         a new process",
                        shown(a),
                        self.one_string
                    ),
                ));
            }
        }
        let (mut variables, mut env_bytes) = (0, 0);
        for (key, value) in env {
            let len = key.len() + 1 + value.len() + 1;
            variables += 1;
            env_bytes += len;
            if len > self.one_string {
                return Err(DaemonError::invalid(
                    "env",
                    format!(
                        "{key}=... is {len} bytes, more than the {} the kernel allows one \
                         variable (KEY=VALUE) of a new process",
                        self.one_string
                    ),
                ));
            }
        }
        let path = argv.first().map_or(0, |p| p.len() + 1);
        let strings = argv.iter().map(|a| a.len() + 1).sum::<usize>() + env_bytes;
        let pointers = (argv.len().max(1) + variables) * size_of::<usize>();
        let total = path + strings + pointers;
        if total > self.total {
            return Err(DaemonError::invalid(
                "args and env",
                format!(
                    "the arguments ({}) and environment variables ({}) take {total} bytes, more \
                     than the {} the kernel allows a new process (a quarter of its stack limit, \
                     at most 6 MiB)",
                    argv.len().saturating_sub(first_arg),
                    variables,
                    self.total
                ),
            ));
        }
        Ok(())
    }
}

/// The start of a long string, for an error message.
fn shown(s: &OsStr) -> String {
    let text = String::from_utf8_lossy(s.as_bytes());
    let head: String = text.chars().take(24).collect();
    if head.len() < text.len() {
        format!("{head:?}...")
    } else {
        format!("{head:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pairs `check` takes.
    fn pairs(env: &[(String, OsString)]) -> impl Iterator<Item = (&str, &OsStr)> {
        env.iter().map(|(k, v)| (k.as_str(), v.as_os_str()))
    }

    const PAGE: usize = 4096;

    fn limits() -> ExecLimits {
        ExecLimits::for_stack(Some(8 << 20), PAGE)
    }

    fn argv(args: &[&str]) -> Vec<OsString> {
        ["/usr/bin/python3", "/run/elide/exec/e/main.py"]
            .iter()
            .chain(args)
            .map(OsString::from)
            .collect()
    }

    #[test]
    fn the_total_is_a_quarter_of_the_stack_between_128_kib_and_6_mib() {
        assert_eq!(limits().total, 2 << 20);
        assert_eq!(limits().one_string, 131_072);
        assert_eq!(ExecLimits::for_stack(None, PAGE).total, 6 << 20);
        assert_eq!(ExecLimits::for_stack(Some(64 << 20), PAGE).total, 6 << 20);
        assert_eq!(ExecLimits::for_stack(Some(64 << 10), PAGE).total, 131_072);
        // With 64 KiB pages one string may be longer than the least total.
        assert_eq!(ExecLimits::for_stack(Some(256 << 10), 65536).total, 131_072);
        assert_eq!(
            ExecLimits::for_stack(Some(8 << 20), 65536).one_string,
            2 << 20
        );
    }

    #[test]
    fn one_string_may_take_its_whole_limit_and_not_a_byte_more() {
        let l = limits();
        // KEY=VALUE plus NUL.
        let fits = vec![(
            "K".to_string(),
            OsString::from("v".repeat(l.one_string - 3)),
        )];
        l.check(&argv(&[]), 2, pairs(&fits))
            .expect("a variable of exactly the limit");
        let over = vec![(
            "K".to_string(),
            OsString::from("v".repeat(l.one_string - 2)),
        )];
        let e = l
            .check(&argv(&[]), 2, pairs(&over))
            .expect_err("one byte over");
        assert!(matches!(&e, DaemonError::InvalidArgument { field, .. } if field == "env"));
        assert!(e.to_string().contains("K=... is 131073 bytes"), "{e}");

        let arg = "a".repeat(l.one_string);
        let e = l
            .check(&argv(&["ok", &arg]), 2, [])
            .expect_err("an argument one byte over");
        assert!(matches!(&e, DaemonError::InvalidArgument { field, .. } if field == "args[1]"));
        assert!(
            e.to_string()
                .contains("\"aaaaaaaaaaaaaaaaaaaaaaaa\"... is 131073 bytes"),
            "{e}"
        );
    }

    /// The real kernel takes a process whose strings fill the limits this machine's processes
    /// have exactly, and refuses one byte more (E2BIG), for one string and for the total.
    #[test]
    fn the_kernel_agrees_at_both_limits() {
        let l = ExecLimits::of_children();
        let spawn = |env: &[(String, OsString)]| {
            std::process::Command::new("/bin/true")
                .env_clear()
                .envs(env.iter().map(|(k, v)| (k, v)))
                .status()
                .map(|s| s.success())
                .map_err(|e| e.raw_os_error())
        };
        let one = |len: usize| vec![("K".to_string(), OsString::from("v".repeat(len - 3)))];
        let argv = vec![OsString::from("/bin/true")];
        l.check(&argv, 1, pairs(&one(l.one_string))).expect("fits");
        assert_eq!(spawn(&one(l.one_string)), Ok(true));
        l.check(&argv, 1, pairs(&one(l.one_string + 1)))
            .expect_err("over");
        assert_eq!(spawn(&one(l.one_string + 1)), Err(Some(libc::E2BIG)));

        // Variables of 100,000 bytes each, then one that takes what is left.
        let filled = |extra: usize| {
            let mut env: Vec<(String, OsString)> = Vec::new();
            let used = |env: &[(String, OsString)]| {
                2 * ("/bin/true".len() + 1)
                    + env
                        .iter()
                        .map(|(k, v)| k.len() + v.len() + 2)
                        .sum::<usize>()
                    + (1 + env.len() + 1) * size_of::<usize>()
            };
            while l.total - used(&env) > 110_000 {
                env.push((
                    format!("V{:04}", env.len()),
                    OsString::from("v".repeat(100_000)),
                ));
            }
            let room = l.total - used(&env);
            env.push((
                "LAST".to_string(),
                OsString::from("v".repeat(room - 6 + extra)),
            ));
            env
        };
        l.check(&argv, 1, pairs(&filled(0)))
            .expect("exactly the total");
        assert_eq!(spawn(&filled(0)), Ok(true));
        l.check(&argv, 1, pairs(&filled(1)))
            .expect_err("one byte over the total");
        assert_eq!(spawn(&filled(1)), Err(Some(libc::E2BIG)));
    }

    #[test]
    fn the_total_counts_the_path_every_string_with_its_nul_and_a_pointer_each() {
        let l = limits();
        let argv = argv(&["x"]);
        let env_at = |value_len: usize| {
            let mut env: Vec<(String, OsString)> = (0..20)
                .map(|i| (format!("V{i:02}"), OsString::from("v".repeat(100_000))))
                .collect();
            env.push(("LAST".to_string(), OsString::from("v".repeat(value_len))));
            env
        };
        let fixed = (argv[0].len() + 1)
            + argv.iter().map(|a| a.len() + 1).sum::<usize>()
            + 20 * (3 + 1 + 100_000 + 1)
            + (4 + 1 + 1)
            + (argv.len() + 21) * 8;
        let room = l.total - fixed;
        l.check(&argv, 2, pairs(&env_at(room)))
            .expect("exactly the total");
        let e = l
            .check(&argv, 2, pairs(&env_at(room + 1)))
            .expect_err("one byte over");
        assert!(
            matches!(&e, DaemonError::InvalidArgument { field, .. } if field == "args and env")
        );
        assert!(
            e.to_string().contains(&format!(
                "(1) and environment variables (21) take {} bytes",
                l.total + 1
            )),
            "{e}"
        );
    }
}
