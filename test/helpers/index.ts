export * from './tmp.js';
export * from './run.js';
export * from './nbd-server.js';
export * from './guest.js';
export * from './data.js';
