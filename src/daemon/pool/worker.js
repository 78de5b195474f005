// elide node worker: started warm by the daemon, used for exactly one execution.
// fd 0 is a stream socket to the daemon: it carries the job (one JSON document, then the
// daemon's shutdown of its sending side) and, back, the exit code once the snippet is done.
// fds 1/2 are pipes the daemon splices to the execution's sinks. The daemon has already moved
// this process into the execution's cgroup when the job arrives.
'use strict';
// Everything lives in this block: a `node -e` script's top-level declarations would be
// globals that the snippet could see.
{
  const fs = require('fs');
  const path = require('path');
  const Module = require('module');

  // Warm up what the first snippet would otherwise pay for: the standard streams (pipes here,
  // the same fds the snippet writes to) and their write path (an empty write sends no byte),
  // console.log's own path on a stream that discards, util.format behind it, and the CommonJS
  // main module path (resolution, package scope lookup, compile wrapper) on an empty file. Node
  // compiles each function on its first call: without this, a job's first console.log took
  // 2.2 ms here, 0.3 ms with it.
  process.stdout.write('');
  process.stderr.write('');
  require('util').format('%s %d %j', 'warm', 1, {});
  {
    const { Writable } = require('stream');
    const discard = new Writable({ write(chunk, encoding, done) { done(); } });
    new (require('console').Console)({ stdout: discard, stderr: discard }).log('%s', 'warm');
    // And what the global console does on a real stream around each write (an error
    // listener added and removed, a write with a callback), empty: 0.15 ms of a job's first
    // console.log here. (The plain writes above warm a path of their own: without them the
    // first console.log took 0.1 ms more.)
    const noop = () => {};
    for (const stream of [process.stdout, process.stderr]) {
      stream.once('error', noop);
      stream.write('', noop);
      stream.removeListener('error', noop);
    }
  }
  try {
    const warm = path.join(process.cwd(), `.elide-warmup-${process.pid}.js`);
    fs.writeFileSync(warm, '');
    try {
      Module.runMain(warm);
    } finally {
      delete Module._cache[warm];
      process.mainModule = undefined;
      fs.unlinkSync(warm);
    }
  } catch (e) {
    // Only a warm-up: the job runs the same code path regardless.
  }
  // And each of the job's own steps once, on something harmless: the working directory, the
  // environment, the job's parsing, and the exit report's writes and closes (0.2 ms a job).
  process.chdir(process.cwd());
  process.env.ELIDE_WORKER_WARMUP = '1';
  for (const k of Object.keys(process.env)) if (k === 'ELIDE_WORKER_WARMUP') delete process.env[k];
  JSON.parse('{"cwd":"/","env":[["K","v"]],"argv":["node","main.js"],"user":null}');
  {
    const fd = fs.openSync('/dev/null', 'w');
    fs.writeSync(fd, String(0) + '\n');
    fs.closeSync(fd);
  }

  // The job is awaited from a callback of the event loop, not from this main script: node
  // drains its tick queue and runs its first loop turn only after the main script ends, and
  // doing that for the first time cost ≈ 1 ms here. This way it happens before the job comes.
  setImmediate(runJob);

  function runJob() {
    // `node -e` gives the global object what `node main.js` does not: a getter for each builtin
    // module under its name (each with the source of the one behind `fs`), and
    // module, exports, require, __filename, __dirname; and its flags show in process.execArgv.
    // (Here, not in the main script: node puts `module` back when the main script ends.)
    {
      const builtinGetter = Object.getOwnPropertyDescriptor(globalThis, 'fs')?.get;
      const builtinSource = builtinGetter && String(builtinGetter);
      for (const name of Object.getOwnPropertyNames(globalThis)) {
        const d = Object.getOwnPropertyDescriptor(globalThis, name);
        if (builtinSource && d.get && String(d.get) === builtinSource) delete globalThis[name];
      }
      for (const name of ['module', 'exports', 'require', '__filename', '__dirname']) {
        delete globalThis[name];
      }
      process.execArgv = [];
    }

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

    // Report the exit code as soon as it is final, ahead of node's own teardown (several ms):
    // every JavaScript exit ends in process.reallyExit, after the 'exit' listeners ran. The
    // standard streams are synchronous for pipes, so closing them here hands the daemon an EOF
    // after the last byte. A fatal error or a signal never gets here; the daemon then waits for
    // the process itself.
    const exitCode = () => {
      const c = process.exitCode;
      return c === undefined || c === null ? 0 : Number(c) | 0;
    };
    const reallyExit = process.reallyExit;
    process.reallyExit = (code) => {
      try {
        fs.closeSync(1);
        fs.closeSync(2);
        fs.writeSync(0, String(code === undefined ? 0 : code) + '\n');
      } catch (e) {
        // The daemon sees the process end instead.
      }
      reallyExit(code);
    };
    // A natural end (empty event loop) takes the same path, unless the snippet listens for
    // 'beforeExit' itself (it may schedule more work, so node's own sequence must run). What
    // follows is node's own natural end: 'exit' with the exit code, which its listeners may
    // still change. (Not process.exit(): its first call loads and compiles more, and it drops
    // the listener that reports an unsettled top-level await.)
    process.on('beforeExit', () => {
      if (process.listenerCount('beforeExit') !== 1) return;
      process._exiting = true;
      process.emit('exit', exitCode());
      process.reallyExit(exitCode());
    });
    Module.runMain(job.argv[1]);
  }
}
