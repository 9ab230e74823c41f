/**
 * Foreground lifetime of `vstore serve` and `vstore nbd`: on SIGTERM or SIGINT run `stop` once
 * (stop accepting, drain, flush, remove sockets), then exit 0 — or 1 if stopping failed. A second
 * signal while stopping is logged and ignored: stopping is what flushes the guest's data.
 */
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
