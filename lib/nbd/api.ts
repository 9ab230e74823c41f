/**
 * Public surface of the NBD server, fixed so that the daemon and the commands can be written
 * against it: one server holds any number of exports and listeners.
 */
import type { Volume } from '../block/volume.js';
import type { Logger } from '../log.js';

export interface NbdExportSpec {
  /** Export name ('' is the default export that `nbd:unix:PATH` reaches). */
  name: string;
  description?: string;
  volume: Volume;
  /** Served read-only even if the volume is writable. */
  readOnly?: boolean;
}

export interface NbdTlsOptions {
  /** PEM certificate chain and key of the server. */
  cert: Buffer | string;
  key: Buffer | string;
  /** PEM CA to verify client certificates; when given, clients must present a certificate it signed. */
  ca?: Buffer | string;
  /** 'on': TLS offered, plaintext allowed; 'require': every export refuses options before STARTTLS. */
  mode: 'on' | 'require';
}

export type NbdListenAddress = { unix: string } | { tcp: { host: string; port: number } };

export interface NbdServerOptions {
  logger: Logger;
  /** TLS, offered on TCP listeners only (unix sockets are local and trusted). */
  tls?: NbdTlsOptions;
  /** Requests in flight per connection before the server stops reading from it (backpressure). Default 128. */
  maxInflightPerConnection?: number;
}

export interface NbdServerStats {
  connections: number;
  exports: Array<{ name: string; connections: number; inflight: number; reads: number; writes: number; bytesRead: number; bytesWritten: number; errors: number }>;
}
