/**
 * A TCP proxy a test controls: one network path to a server. `cut()` closes its listener and
 * resets every connection (a dead link or a stopped listener: connects are refused);
 * `blackhole()` keeps connections open and accepts new ones but forwards nothing (a link that
 * silently drops packets: only timeouts notice); `restore()` forwards again on the same address.
 */
import * as net from 'node:net';

export interface Proxy {
  host: string;
  port: number;
  /** `host:port` */
  address: string;
  /** Bytes forwarded client -> server since the start. */
  readonly bytesUp: number;
  readonly connections: number;
  /** Source addresses of the connections accepted. */
  readonly clients: string[];
  mode: 'pass' | 'cut' | 'blackhole';
  cut(): Promise<void>;
  blackhole(): void;
  restore(): Promise<void>;
  close(): Promise<void>;
}

export async function startProxy(host: string, target: { host: string; port: number }, port = 0): Promise<Proxy> {
  const socks = new Set<net.Socket>();
  let server: net.Server | null = null;
  let bytesUp = 0;
  let connections = 0;
  const clients: string[] = [];
  const self: Proxy = {
    clients,
    host,
    port,
    address: '',
    get bytesUp() {
      return bytesUp;
    },
    get connections() {
      return connections;
    },
    mode: 'pass',
    async cut() {
      self.mode = 'cut';
      // close() waits for the open connections: reset them meanwhile.
      const stopped = stopListening();
      for (const s of socks) s.resetAndDestroy();
      socks.clear();
      await stopped;
    },
    blackhole() {
      self.mode = 'blackhole';
    },
    async restore() {
      if (self.mode === 'cut') await listen();
      self.mode = 'pass';
    },
    async close() {
      const stopped = stopListening();
      for (const s of socks) s.destroy();
      await stopped;
    },
  };
  const onConn = (client: net.Socket): void => {
    connections++;
    clients.push(client.remoteAddress ?? '?');
    const up = net.connect({ host: target.host, port: target.port });
    socks.add(client);
    socks.add(up);
    client.on('data', (b: Buffer) => {
      if (self.mode !== 'pass') return;
      bytesUp += b.length;
      up.write(b);
    });
    up.on('data', (b: Buffer) => {
      if (self.mode === 'pass') client.write(b);
    });
    const end = (): void => {
      client.destroy();
      up.destroy();
      socks.delete(client);
      socks.delete(up);
    };
    for (const s of [client, up]) {
      s.on('error', end);
      s.on('close', end);
    }
  };
  const listen = (): Promise<void> =>
    new Promise((resolve, reject) => {
      const s = net.createServer(onConn);
      s.once('error', reject);
      s.listen(self.port, host, () => {
        self.port = (s.address() as net.AddressInfo).port;
        self.address = `${host}:${self.port}`;
        server = s;
        resolve();
      });
    });
  const stopListening = (): Promise<void> =>
    new Promise((resolve) => {
      const s = server;
      server = null;
      if (!s) return resolve();
      s.close(() => resolve());
    });
  await listen();
  return self;
}
