// lseek(SEEK_DATA/SEEK_HOLE), fallocate(PUNCH_HOLE/ZERO_RANGE) and BLKGETSIZE64.
// Offsets cross the JS boundary as doubles: exact up to 2^53, far beyond any volume size.
#include "file.h"

#include "syserr.h"

#include <cerrno>
#include <cmath>
#include <cstring>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

namespace vstore {
namespace {

bool ArgInt(const Napi::CallbackInfo& info, size_t i, int64_t* out) {
  if (info.Length() <= i || !info[i].IsNumber()) return false;
  double d = info[i].As<Napi::Number>().DoubleValue();
  if (!std::isfinite(d) || d < 0 || d > 9007199254740991.0 || std::floor(d) != d) return false;
  *out = static_cast<int64_t>(d);
  return true;
}

Napi::Value Seek(const Napi::CallbackInfo& info, int whence) {
  Napi::Env env = info.Env();
  int64_t fd, off;
  if (!ArgInt(info, 0, &fd) || !ArgInt(info, 1, &off)) {
    Napi::TypeError::New(env, "expected (fd, offset) as non-negative integers").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  off_t r = lseek(static_cast<int>(fd), static_cast<off_t>(off), whence);
  if (r < 0) {
    if (errno == ENXIO) return Napi::Number::New(env, -1);
    SysError(env, errno, whence == SEEK_DATA ? "lseek(SEEK_DATA)" : "lseek(SEEK_HOLE)").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  return Napi::Number::New(env, static_cast<double>(r));
}

Napi::Value SeekData(const Napi::CallbackInfo& info) { return Seek(info, SEEK_DATA); }
Napi::Value SeekHole(const Napi::CallbackInfo& info) { return Seek(info, SEEK_HOLE); }

// fallocate on the libuv thread pool: punching or zeroing a large range can take a while.
class FallocateWorker : public Napi::AsyncWorker {
 public:
  FallocateWorker(Napi::Env env, int fd, int mode, int64_t off, int64_t len)
      : Napi::AsyncWorker(env), deferred_(Napi::Promise::Deferred::New(env)), fd_(fd), mode_(mode), off_(off), len_(len) {}
  Napi::Promise Promise() { return deferred_.Promise(); }
  void Execute() override {
    int r;
    do {
      r = fallocate(fd_, mode_, static_cast<off_t>(off_), static_cast<off_t>(len_));
    } while (r < 0 && errno == EINTR);
    err_ = r < 0 ? errno : 0;
  }
  void OnOK() override {
    Napi::Env env = Env();
    if (err_) deferred_.Reject(SysError(env, err_, "fallocate").Value());
    else deferred_.Resolve(env.Undefined());
  }

 private:
  Napi::Promise::Deferred deferred_;
  int fd_, mode_;
  int64_t off_, len_;
  int err_ = 0;
};

Napi::Value Fallocate(const Napi::CallbackInfo& info, int mode) {
  Napi::Env env = info.Env();
  int64_t fd, off, len;
  if (!ArgInt(info, 0, &fd) || !ArgInt(info, 1, &off) || !ArgInt(info, 2, &len)) {
    Napi::TypeError::New(env, "expected (fd, offset, length) as non-negative integers").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  if (len == 0) {
    auto d = Napi::Promise::Deferred::New(env);
    d.Resolve(env.Undefined());
    return d.Promise();
  }
  auto* w = new FallocateWorker(env, static_cast<int>(fd), mode, off, len);
  Napi::Promise p = w->Promise();
  w->Queue();
  return p;
}

Napi::Value PunchHole(const Napi::CallbackInfo& info) {
  return Fallocate(info, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE);
}
Napi::Value ZeroRange(const Napi::CallbackInfo& info) {
  return Fallocate(info, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE);
}

Napi::Value BlockDeviceSize(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int64_t fd;
  if (!ArgInt(info, 0, &fd)) {
    Napi::TypeError::New(env, "expected (fd)").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  uint64_t size = 0;
  if (ioctl(static_cast<int>(fd), BLKGETSIZE64, &size) < 0) {
    SysError(env, errno, "ioctl(BLKGETSIZE64)").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  return Napi::Number::New(env, static_cast<double>(size));
}

// preadv2/pwritev2 with RWF_NOWAIT: served straight from the page cache on the calling thread
// when that cannot block; -1 when it would (the caller then goes through the thread pool).
// This removes the thread-pool hop for cached data, the common case of a hot disk.
Napi::Value RwNowait(const Napi::CallbackInfo& info, bool write) {
  Napi::Env env = info.Env();
  int64_t fd, off;
  if (!ArgInt(info, 0, &fd) || info.Length() < 3 || !info[1].IsTypedArray() || !ArgInt(info, 2, &off)) {
    Napi::TypeError::New(env, "expected (fd, buffer, offset)").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  Napi::TypedArray ta = info[1].As<Napi::TypedArray>();
  struct iovec iov;
  iov.iov_base = static_cast<uint8_t*>(ta.ArrayBuffer().Data()) + ta.ByteOffset();
  iov.iov_len = ta.ByteLength();
  ssize_t r;
  do {
    r = write ? pwritev2(static_cast<int>(fd), &iov, 1, static_cast<off_t>(off), RWF_NOWAIT)
              : preadv2(static_cast<int>(fd), &iov, 1, static_cast<off_t>(off), RWF_NOWAIT);
  } while (r < 0 && errno == EINTR);
  if (r < 0) {
    if (errno == EAGAIN || errno == EOPNOTSUPP || errno == ENOSYS) return Napi::Number::New(env, -1);
    SysError(env, errno, write ? "pwritev2" : "preadv2").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  return Napi::Number::New(env, static_cast<double>(r));
}

Napi::Value ReadNowait(const Napi::CallbackInfo& info) { return RwNowait(info, false); }
Napi::Value WriteNowait(const Napi::CallbackInfo& info) { return RwNowait(info, true); }

// SO_SNDBUF / SO_RCVBUF of a socket (capped by the kernel at net.core.wmem_max / rmem_max).
// A 1 MiB NBD read reply then leaves in one write instead of five rounds of poll-and-write
// through the default ~200 KiB unix-socket buffer. Returns the size the kernel granted.
Napi::Value SetSocketBuffers(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int64_t fd, snd, rcv;
  if (!ArgInt(info, 0, &fd) || !ArgInt(info, 1, &snd) || !ArgInt(info, 2, &rcv) || snd > INT32_MAX || rcv > INT32_MAX) {
    Napi::TypeError::New(env, "expected (fd, sendBytes, receiveBytes)").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  int v;
  if (snd > 0) {
    v = static_cast<int>(snd);
    if (setsockopt(static_cast<int>(fd), SOL_SOCKET, SO_SNDBUF, &v, sizeof v) < 0) {
      SysError(env, errno, "setsockopt(SO_SNDBUF)").ThrowAsJavaScriptException();
      return env.Undefined();
    }
  }
  if (rcv > 0) {
    v = static_cast<int>(rcv);
    if (setsockopt(static_cast<int>(fd), SOL_SOCKET, SO_RCVBUF, &v, sizeof v) < 0) {
      SysError(env, errno, "setsockopt(SO_RCVBUF)").ThrowAsJavaScriptException();
      return env.Undefined();
    }
  }
  socklen_t len = sizeof v;
  if (getsockopt(static_cast<int>(fd), SOL_SOCKET, SO_SNDBUF, &v, &len) < 0) v = 0;
  return Napi::Number::New(env, v);
}

}  // namespace

void InitFile(Napi::Env env, Napi::Object exports) {
  exports.Set("seekData", Napi::Function::New(env, SeekData, "seekData"));
  exports.Set("seekHole", Napi::Function::New(env, SeekHole, "seekHole"));
  exports.Set("punchHole", Napi::Function::New(env, PunchHole, "punchHole"));
  exports.Set("zeroRange", Napi::Function::New(env, ZeroRange, "zeroRange"));
  exports.Set("readNowait", Napi::Function::New(env, ReadNowait, "readNowait"));
  exports.Set("writeNowait", Napi::Function::New(env, WriteNowait, "writeNowait"));
  exports.Set("setSocketBuffers", Napi::Function::New(env, SetSocketBuffers, "setSocketBuffers"));
  exports.Set("blockDeviceSize", Napi::Function::New(env, BlockDeviceSize, "blockDeviceSize"));
}

}  // namespace vstore
