/** Structured logs (pino, JSON lines on stderr). Every component takes a Logger; nothing logs globally. */
import { pino } from 'pino';

export type Logger = pino.Logger;

export function createLogger(opts: { level?: string; name?: string } = {}): Logger {
  return pino(
    { name: opts.name ?? 'vstore', level: opts.level ?? process.env.VSTORE_LOG_LEVEL ?? 'info' },
    pino.destination({ dest: 2, sync: false }),
  );
}

/** A logger that drops everything (tests and library use). */
export function silentLogger(): Logger {
  return pino({ level: 'silent' });
}
