# A long-running service: a Python HTTP server on the port Nomad allocates.
job "http-server" {
  datacenters = ["dc1"]
  type        = "service"

  group "web" {
    network {
      port "http" {}
    }

    task "server" {
      driver = "elide"

      config {
        language = "python"
        code     = <<-PY
          import http.server, os, signal, sys

          port = int(os.environ["NOMAD_PORT_http"])

          class Hello(http.server.BaseHTTPRequestHandler):
              def do_GET(self):
                  body = f"hello from {os.environ['NOMAD_ALLOC_ID']}\n".encode()
                  self.send_response(200)
                  self.send_header("Content-Length", str(len(body)))
                  self.end_headers()
                  self.wfile.write(body)

          signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
          print(f"listening on :{port}", flush=True)
          http.server.ThreadingHTTPServer(("0.0.0.0", port), Hello).serve_forever()
        PY
      }

      kill_timeout = "5s"
      kill_signal  = "SIGTERM"

      resources {
        cpu    = 200
        memory = 64
      }
    }
  }
}
