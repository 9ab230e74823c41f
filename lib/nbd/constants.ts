/**
 * Wire constants of the NBD protocol, as doc/proto.md of NetworkBlockDevice/nbd defines them.
 * Values are numbers (u32 magics fit); 64-bit magics are bigint and also split in hi/lo words so
 * that the hot path compares two uint32 reads instead of building a BigInt.
 */

// ---------------------------------------------------------------- magics
/** 'NBDMAGIC', first 8 bytes the server sends (INIT_PASSWD). */
export const NBDMAGIC = 0x4e42444d41474943n;
/** 'IHAVEOPT', newstyle negotiation magic, also prefixes every option request. */
export const IHAVEOPT = 0x49484156454f5054n;
export const IHAVEOPT_HI = 0x49484156;
export const IHAVEOPT_LO = 0x454f5054;
/** Oldstyle cliserv_magic (never sent by this server). */
export const CLISERV_MAGIC = 0x00420281861253n;
/** Magic of every fixed-newstyle option reply. */
export const REPLY_OPT_MAGIC = 0x3e889045565a9n;
export const REPLY_OPT_MAGIC_HI = 0x0003e889;
export const REPLY_OPT_MAGIC_LO = 0x045565a9;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;
/** Extended headers (NBD_OPT_EXTENDED_HEADERS): known, not implemented by this server. */
export const EXTENDED_REQUEST_MAGIC = 0x21e41c71;
export const EXTENDED_REPLY_MAGIC = 0x6e8a278c;

// ---------------------------------------------------------------- handshake flags (server, 16 bits)
export const NBD_FLAG_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_NO_ZEROES = 1 << 1;
// client flags (32 bits)
export const NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_C_NO_ZEROES = 1 << 1;
export const NBD_FLAG_C_KNOWN = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;

// ---------------------------------------------------------------- transmission flags (16 bits)
export const NBD_FLAG_HAS_FLAGS = 1 << 0;
export const NBD_FLAG_READ_ONLY = 1 << 1;
export const NBD_FLAG_SEND_FLUSH = 1 << 2;
export const NBD_FLAG_SEND_FUA = 1 << 3;
export const NBD_FLAG_ROTATIONAL = 1 << 4;
export const NBD_FLAG_SEND_TRIM = 1 << 5;
export const NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6;
export const NBD_FLAG_SEND_DF = 1 << 7;
export const NBD_FLAG_CAN_MULTI_CONN = 1 << 8;
export const NBD_FLAG_SEND_RESIZE = 1 << 9;
export const NBD_FLAG_SEND_CACHE = 1 << 10;
export const NBD_FLAG_SEND_FAST_ZERO = 1 << 11;
export const NBD_FLAG_BLOCK_STAT_PAYLOAD = 1 << 12;

// ---------------------------------------------------------------- options
export const NBD_OPT_EXPORT_NAME = 1;
export const NBD_OPT_ABORT = 2;
export const NBD_OPT_LIST = 3;
export const NBD_OPT_PEEK_EXPORT = 4;
export const NBD_OPT_STARTTLS = 5;
export const NBD_OPT_INFO = 6;
export const NBD_OPT_GO = 7;
export const NBD_OPT_STRUCTURED_REPLY = 8;
export const NBD_OPT_LIST_META_CONTEXT = 9;
export const NBD_OPT_SET_META_CONTEXT = 10;
export const NBD_OPT_EXTENDED_HEADERS = 11;

// ---------------------------------------------------------------- option reply types
export const NBD_REP_ACK = 1;
export const NBD_REP_SERVER = 2;
export const NBD_REP_INFO = 3;
export const NBD_REP_META_CONTEXT = 4;
/** Error replies have bit 31 set. */
export const NBD_REP_FLAG_ERROR = 0x80000000;
export const NBD_REP_ERR_UNSUP = 0x80000000 + 1;
export const NBD_REP_ERR_POLICY = 0x80000000 + 2;
export const NBD_REP_ERR_INVALID = 0x80000000 + 3;
export const NBD_REP_ERR_PLATFORM = 0x80000000 + 4;
export const NBD_REP_ERR_TLS_REQD = 0x80000000 + 5;
export const NBD_REP_ERR_UNKNOWN = 0x80000000 + 6;
export const NBD_REP_ERR_SHUTDOWN = 0x80000000 + 7;
export const NBD_REP_ERR_BLOCK_SIZE_REQD = 0x80000000 + 8;
export const NBD_REP_ERR_TOO_BIG = 0x80000000 + 9;
export const NBD_REP_ERR_EXT_HEADER_REQD = 0x80000000 + 10;

// ---------------------------------------------------------------- NBD_REP_INFO types
export const NBD_INFO_EXPORT = 0;
export const NBD_INFO_NAME = 1;
export const NBD_INFO_DESCRIPTION = 2;
export const NBD_INFO_BLOCK_SIZE = 3;

// ---------------------------------------------------------------- commands
export const NBD_CMD_READ = 0;
export const NBD_CMD_WRITE = 1;
export const NBD_CMD_DISC = 2;
export const NBD_CMD_FLUSH = 3;
export const NBD_CMD_TRIM = 4;
export const NBD_CMD_CACHE = 5;
export const NBD_CMD_WRITE_ZEROES = 6;
export const NBD_CMD_BLOCK_STATUS = 7;
export const NBD_CMD_RESIZE = 8;

// ---------------------------------------------------------------- command flags (16 bits)
export const NBD_CMD_FLAG_FUA = 1 << 0;
export const NBD_CMD_FLAG_NO_HOLE = 1 << 1;
export const NBD_CMD_FLAG_DF = 1 << 2;
export const NBD_CMD_FLAG_REQ_ONE = 1 << 3;
export const NBD_CMD_FLAG_FAST_ZERO = 1 << 4;
export const NBD_CMD_FLAG_PAYLOAD_LEN = 1 << 5;

// ---------------------------------------------------------------- structured replies
export const NBD_REPLY_FLAG_DONE = 1 << 0;
export const NBD_REPLY_TYPE_NONE = 0;
export const NBD_REPLY_TYPE_OFFSET_DATA = 1;
export const NBD_REPLY_TYPE_OFFSET_HOLE = 2;
export const NBD_REPLY_TYPE_BLOCK_STATUS = 5;
export const NBD_REPLY_TYPE_BLOCK_STATUS_EXT = 6;
/** Error chunk types have bit 15 set. */
export const NBD_REPLY_TYPE_FLAG_ERROR = 1 << 15;
export const NBD_REPLY_TYPE_ERROR = (1 << 15) + 1;
export const NBD_REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2;

// ---------------------------------------------------------------- base:allocation
export const NBD_STATE_HOLE = 1 << 0;
export const NBD_STATE_ZERO = 1 << 1;
export const BASE_ALLOCATION = 'base:allocation';

// ---------------------------------------------------------------- error values
export const NBD_EPERM = 1;
export const NBD_EIO = 5;
export const NBD_ENOMEM = 12;
export const NBD_EINVAL = 22;
export const NBD_ENOSPC = 28;
export const NBD_EOVERFLOW = 75;
export const NBD_ENOTSUP = 95;
export const NBD_ESHUTDOWN = 108;

// ---------------------------------------------------------------- sizes and bounds
/** Bytes of the handshake the server sends first: NBDMAGIC, IHAVEOPT, handshake flags. */
export const SERVER_GREETING_SIZE = 18;
export const OPTION_HEADER_SIZE = 16;
export const OPTION_REPLY_HEADER_SIZE = 20;
export const REQUEST_HEADER_SIZE = 28;
export const SIMPLE_REPLY_SIZE = 16;
export const STRUCTURED_REPLY_HEADER_SIZE = 20;
/** Prefix of an OFFSET_DATA chunk before its data: chunk header + 64-bit offset. */
export const OFFSET_DATA_PREFIX = STRUCTURED_REPLY_HEADER_SIZE + 8;
/** Longest string (export name, query, message) the spec allows. */
export const MAX_STRING_LENGTH = 4096;
/** Length the spec says a client must never exceed for a payload if it wants to be portable. */
export const PORTABLE_MAX_PAYLOAD = 32 * 1024 * 1024;
/** Zero padding after NBD_OPT_EXPORT_NAME's reply unless NO_ZEROES. */
export const EXPORT_NAME_PADDING = 124;

const OPT_NAMES: Record<number, string> = {
  1: 'EXPORT_NAME', 2: 'ABORT', 3: 'LIST', 4: 'PEEK_EXPORT', 5: 'STARTTLS', 6: 'INFO', 7: 'GO',
  8: 'STRUCTURED_REPLY', 9: 'LIST_META_CONTEXT', 10: 'SET_META_CONTEXT', 11: 'EXTENDED_HEADERS',
};
const CMD_NAMES: Record<number, string> = {
  0: 'READ', 1: 'WRITE', 2: 'DISC', 3: 'FLUSH', 4: 'TRIM', 5: 'CACHE', 6: 'WRITE_ZEROES', 7: 'BLOCK_STATUS', 8: 'RESIZE',
};

export function optionName(opt: number): string {
  return OPT_NAMES[opt] ?? `OPT_${opt}`;
}
export function commandName(cmd: number): string {
  return CMD_NAMES[cmd] ?? `CMD_${cmd}`;
}
