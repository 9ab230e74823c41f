/**
 * Foreground lifetime of `vstore serve` and `vstore nbd`: on SIGTERM or SIGINT run `stop` once
 * (stop accepting, drain, flush, remove sockets), then exit 0 — or 1 if stopping failed. A second
 * signal while stopping is logged and ignored: stopping is what flushes the guest's data.
 */
import { pino } from 'pino';
import type { Logger } from '../log.js';

export function stopOnSignals(logger: Logger, stop: () => Promise<void>): Promise<number> {
  return new Promise((resolve) => {
    let stopping = false;
    const onSignal = (signal: NodeJS.Signals): void => {
      if (stopping) {
        logger.warn({ signal }, 'already stopping: waiting for in-flight requests to drain and disks to flush');
        return;
      }
      stopping = true;
      logger.info({ signal }, 'signal received: stopping');
      stop().then(
        () => {
          logger.info('exiting 0');
          resolve(0);
        },
        (e: unknown) => {
          logger.error({ err: e }, 'stopping failed');
          resolve(1);
        },
      );
    };
    process.on('SIGTERM', onSignal);
    process.on('SIGINT', onSignal);
  });
}

/**
 * Ends the process with exit status 1 and `vstore: MESSAGE` as the last line on stderr — after
 * every log line already logged. pino writes asynchronously and its flush() does not wait for a
 * write under way, so the line goes through the logger's own stream (which keeps the order), and
 * the process ends when the event loop is empty, i.e. once everything is written (at most 2 s).
 */
export function failAfterLogs(logger: Logger, message: string): void {
  const line = `vstore: ${message}\n`;
  const stream = (logger as unknown as Record<symbol, { write?: (s: string) => unknown } | undefined>)[pino.symbols.streamSym];
  process.exitCode = 1;
  if (typeof stream?.write === 'function') stream.write(line);
  else process.stderr.write(line);
  setTimeout(() => process.exit(1), 2000).unref();
}

/** Exits with `code` once logs are written (pino writes asynchronously). */
export function exitAfterLogs(logger: Logger, code: number): void {
  process.exitCode = code;
  const done = (): void => process.exit(code);
  try {
    logger.flush(() => done());
  } catch {
    done();
  }
  setTimeout(done, 2000).unref();
}
