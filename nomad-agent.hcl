# Nomad agent config for trying the elide driver locally:
#   make build && sudo nomad agent -dev -config=nomad-agent.hcl
# `make build` installs the plugin as build/plugins/elide (the file name must match the
# `plugin "elide"` label and the driver name).

data_dir   = "/tmp/nomad-elide"
plugin_dir = "./build/plugins"

client {
  enabled = true
}

plugin "elide" {
  config {
    # Where elide-daemon listens (absolute path). Task stdout/stderr go to Nomad's logmon
    # FIFOs, which the daemon opens; if the daemon's own config sets `output_roots`, it must
    # include Nomad's <data_dir>/alloc (without output_roots, FIFOs are accepted anywhere).
    daemon_socket = "/run/elide/daemon.sock"

    # How often the driver re-checks the daemon's health.
    fingerprint_period = "30s"

    # Let Nomad (1.8+) pick a uid for each task that sets no `user` (`nomad-<N>`, from the
    # client's dynamic user range) instead of running it as the daemon's user, root. The
    # interpreters must then be runnable by any user (not under /root).
    dynamic_workload_users = false

    # The daemon session this client's tasks run in, named after this block: a restarted agent
    # finds it again, warm pools included.
    session_config {
      context_pool_size  = 2                                   # warm workers per language (0 = none)
      enabled_languages  = ["python", "javascript", "typescript"] # aliases: py, js, ts
      enabled_intrinsics = ["env", "io", "net"]                # what snippets may use
      memory_limit_mb    = 0                                   # per-execution cap, 0 = none
      enable_ai          = false
      # Offer snippet memory to the kernel's same-page merging (KSM; needs ksmd running:
      # echo 1 > /sys/kernel/mm/ksm/run). Idle python snippets then share most of the pages
      # they copied from the zygote. Merged snippets can time each other's memory writes.
      merge_identical_pages = false
    }

    # Every `period`, kill (SIGKILL, logged) what the daemon runs in a task dir of this agent's
    # alloc dir although no task of the plugin holds it, once every look for `creation_grace`
    # found it so: e.g. a task Nomad destroyed while
    # the daemon could not answer, when the agent restarted before the plugin's retries got
    # through. As the docker driver's dangling container reconciler.
    dangling_executions {
      enabled        = true
      period         = "5m"
      creation_grace = "5m"
    }

    # Finding or starting the daemon. With auto_start, the plugin starts elide-daemon detached
    # (own session, stdio to log_file) when nothing answers on daemon_socket; the daemon then
    # outlives agent and plugin restarts. Without `path`, the binary is looked up next to the
    # plugin's real path, then at <plugin_dir>/../bin/elide-daemon (here build/bin; Nomad 1.6
    # launches every executable in plugin_dir, so the daemon must not live there), then on PATH.
    # In production, run the daemon as a service (deploy/systemd/elide-daemon.service) and set
    # auto_start = false.
    daemon {
      auto_start    = true
      # path        = "/usr/local/bin/elide-daemon"   # default: looked up as said above
      args          = []
      log_file      = "/tmp/nomad-elide/elide-daemon.log" # default: elide-daemon.log next to daemon_socket
      start_timeout = "10s"
    }
  }
}
