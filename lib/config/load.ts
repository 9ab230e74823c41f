/**
 * Reading config documents: a file (JSON or YAML, chosen by extension, else by content) or text
 * (stdin, a control request), into validated, resolved objects. Every failure is a ConfigError
 * whose message names the file and the field.
 */
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { parse as parseYaml, YAMLParseError } from 'yaml';
import { ConfigError, parseConfig, type DaemonConfig } from './schema.js';

export type ConfigFormat = 'json' | 'yaml';

function formatOf(file: string | undefined, text: string): ConfigFormat {
  const ext = file ? path.extname(file).toLowerCase() : '';
  if (ext === '.json') return 'json';
  if (ext === '.yaml' || ext === '.yml') return 'yaml';
  return /^\s*[{[]/.test(text) ? 'json' : 'yaml';
}

/** Parses JSON or YAML text into plain data (no validation). */
export function parseDocument(text: string, opts: { file?: string; format?: ConfigFormat; source?: string } = {}): unknown {
  const format = opts.format ?? formatOf(opts.file, text);
  const source = opts.source ?? opts.file;
  try {
    if (format === 'json') return JSON.parse(text) as unknown;
    return parseYaml(text, { prettyErrors: true, uniqueKeys: true }) as unknown;
  } catch (e) {
    const msg = e instanceof YAMLParseError ? e.message.split('\n')[0]! : (e as Error).message;
    throw new ConfigError([`not valid ${format.toUpperCase()}: ${msg}`], source);
  }
}

/** Reads a document from a file, or from stdin when `file` is '-'. */
export async function readDocument(file: string): Promise<{ data: unknown; baseDir: string; source: string }> {
  if (file === '-') {
    const chunks: Buffer[] = [];
    for await (const c of process.stdin) chunks.push(c as Buffer);
    const text = Buffer.concat(chunks).toString('utf8');
    return { data: parseDocument(text, { source: 'stdin' }), baseDir: process.cwd(), source: 'stdin' };
  }
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    const why = code === 'ENOENT' ? 'no such file' : code === 'EACCES' ? 'permission denied' : code === 'EISDIR' ? 'is a directory' : (e as Error).message;
    throw new ConfigError([why], file);
  }
  return { data: parseDocument(text, { file }), baseDir: path.dirname(path.resolve(file)), source: file };
}

/** Loads, validates and resolves the daemon config file (relative paths are relative to the file). */
export async function loadConfig(file: string): Promise<DaemonConfig> {
  const { data, baseDir, source } = await readDocument(file);
  return parseConfig(data, baseDir, source);
}
