// The e2e helper's console result lines: checksummed copies, damaged ones ignored, one per sequence.
import { createHash } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { parseResultLine } from '../helpers/guest.js';

const line = (seq: number, key: string, value: string): string =>
  `@@RESULTC ${seq} ${createHash('md5').update(`${key} ${value}`).digest('hex').slice(0, 8)} ${key} ${value}`;

describe('guest result lines', () => {
  it('takes the first intact copy of each result and ignores damaged copies and repeats', () => {
    const seen = new Set<number>();
    const good = line(1, 'sum', 'ab12cd34');
    const damaged = good.replace('ab12', 'ab2'); // a character lost on the console
    expect(parseResultLine(damaged, seen)).toBeNull();
    expect(parseResultLine(good.replace('@@RESULTC 1 ', '@@RESULTC 1'), seen)).toBeNull(); // lost in the header
    expect(parseResultLine(good.replace('@@RESULTC', '@@RESULT'), seen)).toBeNull(); // 'C' lost: not a key/value line

    expect(parseResultLine(good, seen)).toEqual({ key: 'sum', value: 'ab12cd34' });
    expect(parseResultLine(good, seen)).toBeNull(); // the second copy
    expect(parseResultLine(line(2, 'empty', ''), seen)).toEqual({ key: 'empty', value: '' });
    expect(parseResultLine(line(4, 'listing', 'a b c ') + '\r', seen)).toEqual({ key: 'listing', value: 'a b c' }); // a value ending in a space
    expect(parseResultLine(line(3, 'sum', 'ab12cd34'), seen)).toEqual({ key: 'sum', value: 'ab12cd34' }); // a new emission of the same key
  });
  it('takes lines without a checksum as they come (scripts that echo @@RESULT themselves)', () => {
    expect(parseResultLine('  @@RESULT err write /a 3\r', new Set())).toEqual({ key: 'err', value: 'write /a 3' });
    expect(parseResultLine('not a result', new Set())).toBeNull();
  });
});
