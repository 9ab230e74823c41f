// An in-process directory service for RemoteFileTree tests: lib/rpc's server with the node's
// directory handlers (lib/node/dirs.ts) over LocalFileTree on a temp DATA directory. It can be
// stopped and started again on the same socket, as a node restart would.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { LocalFileTree } from '../../../lib/fs/local.js';
import { RemoteFileTree } from '../../../lib/fs/remote.js';
import { silentLogger } from '../../../lib/log.js';
import { NodeDirs } from '../../../lib/node/dirs.js';
import { RpcServer } from '../../../lib/rpc/index.js';

export interface DirServer {
  data: string;
  socket: string;
  dirs: NodeDirs;
  /** The share's directory on the "node". */
  shareDir(p: string): string;
  stop(): Promise<void>;
  start(): Promise<void>;
}

export async function startDirServer(data = fs.mkdtempSync(path.join(os.tmpdir(), 'vstore-dirs-')), opts: { maxInFlight?: number } = {}): Promise<DirServer> {
  const socket = path.join(data, 'control.sock');
  let server: RpcServer | undefined;
  const self: DirServer = {
    data,
    socket,
    dirs: undefined as unknown as NodeDirs,
    shareDir: (p) => path.join(data, 'dirs', ...p.slice(1).split('/')),
    async start() {
      const dirs = new NodeDirs({ data, logger: silentLogger(), openTree: (root) => LocalFileTree.open(root) });
      server = new RpcServer({
        logger: silentLogger(),
        handlers: dirs.handlers(),
        onDisconnect: (c) => dirs.disconnect(c.conn),
        ...(opts.maxInFlight ? { maxInFlight: opts.maxInFlight } : {}),
      });
      await server.listen(`unix:${socket}`);
      self.dirs = dirs;
    },
    async stop() {
      await server?.close();
      await self.dirs.close();
      server = undefined;
    },
  };
  await self.start();
  return self;
}

export function remoteTree(srv: DirServer, share: string, opts: Partial<ConstructorParameters<typeof RemoteFileTree>[0]> = {}): RemoteFileTree {
  return new RemoteFileTree({ addresses: [`unix:${srv.socket}`], path: share, logger: silentLogger(), timeoutMs: 5000, reconnectTimeoutMs: 5000, ...opts });
}
