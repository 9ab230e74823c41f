/**
 * The NBD server: any number of exports and listeners (unix sockets, TCP with optional TLS).
 * Connections (connection.ts) do the protocol; this file owns lifecycles: listening, export
 * registration and removal with draining, shutdown, stats.
 */
import { promises as fsp } from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import * as tls from 'node:tls';
import type { Logger } from '../log.js';
import type { NbdExportSpec, NbdListenAddress, NbdServerOptions, NbdServerStats } from './api.js';
import * as C from './constants.js';
import { BufferPool } from './bufpool.js';
import { Connection, type ConnectionHost, type TlsSetup } from './connection.js';
import { ServedExport } from './export.js';

interface Listener {
  server: net.Server;
  addr: NbdListenAddress;
  /** Unix socket path to remove on close. */
  unixPath?: string;
}

export class NbdServer {
  private readonly logger: Logger;
  private readonly exports = new Map<string, ServedExport>();
  private readonly listeners: Listener[] = [];
  private readonly connections = new Set<Connection>();
  private readonly host: ConnectionHost;
  private closing: Promise<void> | null = null;

  constructor(opts: NbdServerOptions) {
    this.logger = opts.logger;
    const maxInflight = opts.maxInflightPerConnection ?? 128;
    const handshakeTimeoutMs = opts.handshakeTimeoutMs ?? 30_000;
    const maxPayload = opts.maxPayload ?? C.PORTABLE_MAX_PAYLOAD;
    const sparseReadThreshold = opts.sparseReadThreshold ?? 64 * 1024;
    const socketBufferBytes = opts.socketBufferBytes ?? 4 * 1024 * 1024;
    if (!Number.isSafeInteger(maxInflight) || maxInflight < 1) throw new RangeError('maxInflightPerConnection must be >= 1');
    if (!(handshakeTimeoutMs > 0)) throw new RangeError('handshakeTimeoutMs must be > 0');
    if (!Number.isSafeInteger(maxPayload) || maxPayload < 512 || maxPayload > 0xffffffff) {
      throw new RangeError('maxPayload must be an integer in [512, 2^32-1]');
    }
    if (!(sparseReadThreshold >= 0)) throw new RangeError('sparseReadThreshold must be >= 0');
    if (!Number.isSafeInteger(socketBufferBytes) || socketBufferBytes < 0 || socketBufferBytes > 0x7fffffff) {
      throw new RangeError('socketBufferBytes must be an integer in [0, 2^31-1]');
    }
    let tlsSetup: TlsSetup | undefined;
    if (opts.tls) {
      const t = opts.tls;
      tlsSetup = {
        context: tls.createSecureContext({ cert: t.cert, key: t.key, ca: t.ca, minVersion: 'TLSv1.2' }),
        requireClientCert: t.ca !== undefined,
        mode: t.mode,
      };
    }
    const self = this;
    this.host = {
      logger: this.logger,
      tls: tlsSetup,
      maxInflight,
      handshakeTimeoutMs,
      maxPayload,
      sparseReadThreshold,
      socketBufferBytes,
      buffers: new BufferPool(16 * 1024 * 1024),
      get shuttingDown() {
        return self.closing !== null;
      },
      lookupExport: (name) => this.exports.get(name),
      listExports: () => [...this.exports.values()],
      attached: (conn, exp) => {
        exp.connections.add(conn);
      },
      closed: (conn) => {
        this.connections.delete(conn);
        conn.exp?.connections.delete(conn);
      },
    };
  }

  addExport(spec: NbdExportSpec): void {
    if (typeof spec.name !== 'string' || Buffer.byteLength(spec.name) > C.MAX_STRING_LENGTH || spec.name.includes('\0')) {
      throw new Error(`invalid export name ${JSON.stringify(spec.name)}`);
    }
    if (this.exports.has(spec.name)) throw new Error(`export '${spec.name}' already exists`);
    if (this.closing) throw new Error('server is closing');
    this.exports.set(spec.name, new ServedExport(spec, this.host.maxPayload));
    this.logger.info({ export: spec.name, size: spec.volume.size, readOnly: Boolean(spec.readOnly) }, 'nbd: export added');
  }

  /**
   * Removes an export: no new connection can reach it, requests in flight complete (new ones
   * get ESHUTDOWN), it is flushed when writable, then its clients are disconnected. The volume
   * itself is not closed (its owner does that).
   */
  async removeExport(name: string): Promise<void> {
    const exp = this.exports.get(name);
    if (!exp) throw new Error(`no export named '${name}'`);
    this.exports.delete(name);
    exp.closing = true;
    await this.shutdownExport(exp);
    this.logger.info({ export: name }, 'nbd: export removed');
  }

  private async shutdownExport(exp: ServedExport): Promise<void> {
    const conns = [...exp.connections];
    await Promise.all(conns.map((c) => c.drain()));
    await exp.idle();
    if (!exp.readOnly && exp.volume.caps.flush) {
      try {
        await exp.volume.flush();
      } catch (e) {
        this.logger.error({ export: exp.name, err: (e as Error).message }, 'nbd: flush on export removal failed');
      }
    }
    await Promise.all(conns.map((c) => c.terminate()));
  }

  async listen(addr: NbdListenAddress): Promise<void> {
    if (this.closing) throw new Error('server is closing');
    if ('unix' in addr) await this.listenUnix(addr.unix);
    else await this.listenTcp(addr.tcp.host, addr.tcp.port);
  }

  private makeServer(isTcp: boolean): net.Server {
    const server = net.createServer({ noDelay: isTcp, pauseOnConnect: false }, (socket) => {
      if (this.closing) {
        socket.destroy();
        return;
      }
      socket.on('error', () => {});
      const conn = new Connection(socket, this.host, isTcp);
      this.connections.add(conn);
    });
    server.on('error', (e) => this.logger.error({ err: e.message }, 'nbd: listener error'));
    return server;
  }

  private async listenUnix(target: string): Promise<void> {
    const abs = path.resolve(target);
    await removeStaleSocket(abs);
    // Bind inside a private directory, restrict the socket to its owner, then rename it into
    // place: there is no moment at which the socket exists at `abs` with wider permissions.
    const dir = await fsp.mkdtemp(path.join(path.dirname(abs), '.nbd-'));
    const tmp = path.join(dir, 's');
    const server = this.makeServer(false);
    try {
      await listenOn(server, { path: tmp });
      await fsp.chmod(tmp, 0o600);
      await fsp.rename(tmp, abs);
    } catch (e) {
      server.close();
      await fsp.rm(dir, { recursive: true, force: true });
      throw e;
    }
    await fsp.rm(dir, { recursive: true, force: true });
    this.listeners.push({ server, addr: { unix: abs }, unixPath: abs });
    this.logger.info({ unix: abs }, 'nbd: listening');
  }

  private async listenTcp(host: string, port: number): Promise<void> {
    const server = this.makeServer(true);
    await listenOn(server, { host, port });
    const a = server.address() as net.AddressInfo;
    this.listeners.push({ server, addr: { tcp: { host: a.address, port: a.port } } });
    this.logger.info({ host: a.address, port: a.port, tls: this.host.tls?.mode ?? 'off' }, 'nbd: listening');
  }

  /** The bound addresses (for TCP port 0, the port the system chose). */
  get addresses(): NbdListenAddress[] {
    return this.listeners.map((l) => l.addr);
  }

  /**
   * Stops accepting, lets every in-flight request finish (new requests get ESHUTDOWN), flushes
   * every writable export and closes all connections.
   */
  close(): Promise<void> {
    if (!this.closing) this.closing = this.doClose();
    return this.closing;
  }

  private async doClose(): Promise<void> {
    const listeners = this.listeners.splice(0);
    // server.close() stops accepting at once, but its callback waits for every connection:
    // collect it at the end.
    const stopped = listeners.map((l) => new Promise<void>((resolve) => l.server.close(() => resolve())));
    await Promise.all(listeners.map((l) => (l.unixPath ? fsp.rm(l.unixPath, { force: true }) : undefined)));
    for (const c of this.connections) if (!c.inTransmission) c.destroy();
    const exps = [...this.exports.values()];
    for (const e of exps) e.closing = true;
    await Promise.all(exps.map((e) => this.shutdownExport(e)));
    // Connections on exports removed meanwhile, or lingering ones.
    await Promise.all([...this.connections].map((c) => c.terminate()));
    this.exports.clear();
    await Promise.all(stopped);
    this.logger.info('nbd: server closed');
  }

  stats(): NbdServerStats {
    return {
      connections: this.connections.size,
      exports: [...this.exports.values()].map((e) => ({
        name: e.name,
        connections: e.connections.size,
        inflight: e.inflight,
        reads: e.counters.reads,
        writes: e.counters.writes,
        bytesRead: e.counters.bytesRead,
        bytesWritten: e.counters.bytesWritten,
        errors: e.counters.errors,
      })),
    };
  }
}

function listenOn(server: net.Server, opts: net.ListenOptions): Promise<void> {
  return new Promise((resolve, reject) => {
    const onError = (e: Error): void => reject(e);
    server.once('error', onError);
    server.listen(opts, () => {
      server.removeListener('error', onError);
      resolve();
    });
  });
}

/** Removes a socket file nobody listens on; refuses to take over a live one or a non-socket. */
async function removeStaleSocket(p: string): Promise<void> {
  let st;
  try {
    st = await fsp.lstat(p);
  } catch {
    return;
  }
  if (!st.isSocket()) throw Object.assign(new Error(`${p} exists and is not a socket`), { code: 'EEXIST' });
  const live = await new Promise<boolean>((resolve) => {
    const s = net.connect({ path: p });
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
  if (live) throw Object.assign(new Error(`${p} is in use by a live server`), { code: 'EADDRINUSE' });
  await fsp.rm(p, { force: true });
}
