#!/usr/bin/env node
// Entry point of the `vstore` command: the compiled CLI lives in dist/ (npm run build).
import { main } from '../dist/lib/cli/index.js';
main(process.argv).catch((err) => {
  process.stderr.write(`vstore: ${err && err.message ? err.message : err}\n`);
  process.exit(1);
});
