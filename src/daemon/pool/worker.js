// elide node worker: started warm by the daemon, used for exactly one execution.
// fd 0 carries the job (one JSON document, then EOF); fds 1/2 are pipes the daemon splices to
// the execution's sinks. The daemon has already moved this process into the execution's cgroup.
'use strict';
const fs = require('fs');
const Module = require('module');
let job;
try {
  job = JSON.parse(fs.readFileSync(0, 'utf8'));
} catch (e) {
  // The daemon closed the pool (EOF without a job) or sent garbage: nothing to run.
  process.exit(0);
}
delete process._eval;
try {
  if (job.user) {
    process.setgroups(job.user.groups);
    process.setgid(job.user.gid);
    process.setuid(job.user.uid);
  }
  process.chdir(job.cwd);
} catch (e) {
  process.stderr.write('elide-worker: isolation step failed: ' + e.message + '\n');
  process.exit(127);
}
for (const k of Object.keys(process.env)) delete process.env[k];
for (const [k, v] of job.env) process.env[k] = v;
process.argv = [process.execPath].concat(job.argv.slice(1));
Module.runMain(job.argv[1]);
