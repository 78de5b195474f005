# A batch job that prints a greeting from Python.
#   nomad job run examples/hello-python.nomad && nomad alloc logs <alloc-id>
job "hello-python" {
  datacenters = ["dc1"]
  type        = "batch"

  group "hello" {
    task "hello" {
      driver = "elide"

      config {
        language = "python"
        code     = <<-PY
          import os, sys
          print(f"hello from python {sys.version.split()[0]} in {os.environ['NOMAD_TASK_NAME']}")
        PY
      }

      resources {
        cpu    = 100
        memory = 64
      }
    }
  }
}
