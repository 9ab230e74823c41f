/**
 * Running peer programs: capture output with a timeout, and check that peers exist.
 * A missing peer is a failure (scripts/setup.sh installs them all), never a skip.
 */
import { spawn, spawnSync, type SpawnOptions } from 'node:child_process';

export interface RunResult {
  cmd: string;
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  /** Milliseconds from spawn to exit. */
  ms: number;
  timedOut: boolean;
}

export interface RunOptions {
  timeoutMs?: number;
  input?: string | Buffer;
  env?: NodeJS.ProcessEnv;
  cwd?: string;
  /** Throw unless the exit status is 0 (default true). */
  check?: boolean;
  /** Called with each chunk of stdout as it arrives (to react to a program while it runs). */
  onStdout?: (chunk: string) => void;
}

/** Runs `file args...` (no shell), captures stdout/stderr; kills it with SIGKILL at the timeout. */
export function run(file: string, args: string[], opts: RunOptions = {}): Promise<RunResult> {
  const timeoutMs = opts.timeoutMs ?? 60_000;
  const check = opts.check ?? true;
  const cmd = [file, ...args].map(quote).join(' ');
  const started = Date.now();
  return new Promise((resolve, reject) => {
    const spawnOpts: SpawnOptions = { cwd: opts.cwd, env: opts.env ?? process.env, stdio: ['pipe', 'pipe', 'pipe'] };
    const child = spawn(file, args, spawnOpts);
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    let timedOut = false;
    child.stdout!.on('data', (b: Buffer) => {
      out.push(b);
      opts.onStdout?.(b.toString('utf8'));
    });
    child.stderr!.on('data', (b: Buffer) => err.push(b));
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill('SIGKILL');
    }, timeoutMs);
    child.on('error', (e) => {
      clearTimeout(timer);
      reject(new Error(`${cmd}: ${e.message}`));
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      const res: RunResult = {
        cmd,
        code,
        signal,
        stdout: Buffer.concat(out).toString('utf8'),
        stderr: Buffer.concat(err).toString('utf8'),
        ms: Date.now() - started,
        timedOut,
      };
      if (check && (code !== 0 || timedOut)) reject(new RunError(res));
      else resolve(res);
    });
    child.stdin!.on('error', () => {});
    if (opts.input !== undefined) child.stdin!.end(opts.input);
    else child.stdin!.end();
  });
}

export class RunError extends Error {
  constructor(readonly result: RunResult) {
    super(
      `${result.cmd} ${result.timedOut ? 'timed out' : `exited ${result.code ?? result.signal}`}\n` +
        `--- stdout\n${tail(result.stdout)}\n--- stderr\n${tail(result.stderr)}`,
    );
    this.name = 'RunError';
  }
}

function tail(s: string, n = 4000): string {
  return s.length > n ? `...${s.slice(-n)}` : s;
}

export function quote(s: string): string {
  return /^[\w@%+=:,./-]+$/.test(s) ? s : `'${s.replace(/'/g, `'\\''`)}'`;
}

/** Absolute path of a command on $PATH, or null. */
export function which(cmd: string): string | null {
  const r = spawnSync('sh', ['-c', `command -v ${quote(cmd)}`], { encoding: 'utf8' });
  const p = r.stdout.trim();
  return r.status === 0 && p ? p : null;
}

/**
 * Throws (the test fails) when any command is missing: the suite's setup installs every peer,
 * so a missing one means a broken machine, not an optional feature.
 */
export function requireCommands(...cmds: string[]): void {
  const missing = cmds.filter((c) => which(c) === null);
  if (missing.length) {
    throw new Error(`required peer program(s) missing: ${missing.join(', ')} (run scripts/setup.sh)`);
  }
}

/** Checks that a Python module imports (e.g. `nbd` from python3-libnbd, used by nbdsh). */
export function requirePythonModule(mod: string): void {
  const py = which('/usr/bin/python3') ?? 'python3'; // Debian's, where python3-* packages live
  const r = spawnSync(py, ['-c', `import ${mod}`], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`python3 module ${mod} missing (run scripts/setup.sh): ${r.stderr}`);
}

/**
 * Runs Python code under nbdsh (libnbd's Python shell; `nbd` is imported, `h` is an unconnected
 * handle). nbdsh runs `python3 -m nbd` from $PATH: /usr/bin comes first so a python3 from
 * pyenv or a venv, which lacks python3-libnbd, does not shadow Debian's.
 */
export function nbdsh(code: string, opts: { env?: Record<string, string>; timeoutMs?: number; check?: boolean } = {}): Promise<RunResult> {
  return run('nbdsh', ['-c', code], {
    env: { ...process.env, ...opts.env, PATH: `/usr/bin:/bin:${process.env.PATH ?? ''}` },
    timeoutMs: opts.timeoutMs ?? 60_000,
    check: opts.check,
  });
}
