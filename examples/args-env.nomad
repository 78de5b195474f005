# A script file rendered into the task dir, run with arguments and extra environment.
job "args-env" {
  datacenters = ["dc1"]
  type        = "batch"

  group "demo" {
    task "demo" {
      driver = "elide"

      template {
        destination = "local/main.py"
        data        = <<-PY
          import os, sys
          print("argv:", sys.argv[1:])
          print("GREETING =", os.environ.get("GREETING"))
          print("task dir =", os.environ["NOMAD_TASK_DIR"])
        PY
      }

      config {
        language = "python"
        script   = "local/main.py"
        args     = ["--name", "nomad", "${NOMAD_ALLOC_INDEX}"]
        env = {
          GREETING = "hello from the driver config"
        }
      }

      env {
        FROM_TASK_ENV = "also visible"
      }

      resources {
        cpu    = 100
        memory = 64
      }
    }
  }
}
