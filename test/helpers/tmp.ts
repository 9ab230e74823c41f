/**
 * Temporary directories for integration and e2e tests, removed when the test file ends.
 * Paths stay short (unix socket paths are limited to 107 bytes).
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll } from 'vitest';

const dirs: string[] = [];
let hooked = false;

/** A fresh directory under the system temp dir; removed in afterAll unless VSTORE_KEEP_TMP=1. */
export function tempDir(prefix = 'vstore-'): string {
  const dir = mkdtempSync(path.join(tmpdir(), prefix));
  dirs.push(dir);
  if (!hooked) {
    hooked = true;
    afterAll(() => {
      if (process.env.VSTORE_KEEP_TMP === '1') return;
      for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
    });
  }
  return dir;
}
