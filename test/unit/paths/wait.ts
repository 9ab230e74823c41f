/** Polls `fn` until it returns something truthy (resolved with it), or throws after `ms` with `log()`'s tail. */
export async function waitFor<T>(what: string, fn: () => T | undefined | false | Promise<T | undefined | false>, ms: number, log: () => string = () => '', everyMs = 50): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}${log() ? `:\n${log().slice(-4000)}` : ''}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}
