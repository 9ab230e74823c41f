// The one way native code reports a failed system call to JavaScript: an Error shaped like
// Node's own fs errors (message "CODE: strerror, syscall", .code, .errno, .syscall), so that
// toVolumeError() and callers treat it like any fs error.
#pragma once
#include <napi.h>

#include <cerrno>
#include <cstring>
#include <string>

namespace vstore {

inline const char* ErrnoCode(int err) {
  // EOPNOTSUPP and ENOTSUP are one value on Linux; Node spells it ENOTSUP. ENOTTY comes from an
  // ioctl the file does not support (BLKGETSIZE64 on a regular file).
  if (err == EOPNOTSUPP || err == ENOTTY) return "ENOTSUP";
  const char* name = strerrorname_np(err);
  return name ? name : "EIO";
}

inline Napi::Error SysError(Napi::Env env, int err, const char* syscall) {
  const char* code = ErrnoCode(err);
  std::string msg = std::string(code) + ": " + strerror(err) + ", " + syscall;
  Napi::Error e = Napi::Error::New(env, msg);
  e.Set("code", Napi::String::New(env, code));
  e.Set("errno", Napi::Number::New(env, -err));
  e.Set("syscall", Napi::String::New(env, syscall));
  return e;
}

}  // namespace vstore
