//! `elide-daemon`: the node daemon and its operator CLI (see `elide_task_driver::daemon::cli`).

fn main() -> std::process::ExitCode {
    elide_task_driver::daemon::cli::main()
}
