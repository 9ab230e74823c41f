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
  /** A client that has not finished the handshake (entered transmission) by then is disconnected. Default 30 s. */
  handshakeTimeoutMs?: number;
  /**
   * Hard cap on one request's payload (a WRITE longer than this makes the server disconnect the
   * client: its payload would be a denial of service). Also caps the advertised maximum block
   * size. Default 32 MiB (the spec's portable maximum).
   */
  maxPayload?: number;
  /**
   * With structured replies, reads at least this long consult the volume's blockStatus and send
   * zero regions as OFFSET_HOLE chunks; shorter reads are one data chunk (a block-status lookup
   * would cost more than it saves). 0: always. Default 64 KiB.
   */
  sparseReadThreshold?: number;
  /**
   * Kernel send/receive buffer asked for each client socket (SO_SNDBUF/SO_RCVBUF, capped by
   * net.core.wmem_max/rmem_max). A large send buffer lets a big read reply leave in one write
   * instead of rounds of poll-and-write through the ~200 KiB default. 0: kernel default.
   * Default 4 MiB.
   */
  socketBufferBytes?: number;
}

export interface NbdServerStats {
  connections: number;
  exports: Array<{ name: string; connections: number; inflight: number; reads: number; writes: number; bytesRead: number; bytesWritten: number; errors: number }>;
}
