/** Multipath to storage nodes: path state, selection, health checks, damping, failback. */
export { Path, type PathState, type PathStatus, type RequestKind } from './path.js';
export { NodePaths, PathTable, type NodePathsOptions, type PathChangeEvent } from './node-paths.js';
export { DEFAULT_PATH_POLICY, SELECTORS, pathPolicy, realClock, type Clock, type DampingPolicy, type FailbackPolicy, type PathPolicy, type SelectorName } from './policy.js';
export { probeNbdGreeting, type Prober } from './probe.js';
export { selectPath, type Cursor, type SelectOptions } from './select.js';
