// The *at system calls LocalFileTree (lib/fs/local.ts) needs to serve a directory confined to
// its root, as virtiofsd's passthrough does: every call is relative to a file descriptor the
// tree holds (an O_PATH fd per node), one path component at a time through openat2
// (RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS), and operations on a node
// itself go through "/proc/self/fd/N" built here from the fd number only, never from a name.
//
// Every call runs on the libuv thread pool and returns a Promise: on a storage node even a
// metadata call (a lookup in a cold directory, an unlink of a large file) can wait for the disk,
// and the event loop serves other VMs meanwhile. Names arrive as Buffers (Linux names are bytes)
// and are copied before the work is queued; a name containing NUL is refused with EINVAL here
// too, because a C string would silently cut it short.
#include "fs.h"

#include "syserr.h"

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fcntl.h>
#include <climits>
#include <functional>
#include <linux/openat2.h>
#include <string>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/xattr.h>
#include <unistd.h>

namespace vstore {
namespace {

// What a call produced: a number (an fd, a byte count, an offset), and optionally a stat, raw
// bytes or a statfs.
struct FsResult {
  int err = 0;
  double value = 0;
  enum { kNumber, kStat, kBytes, kStatfs } kind = kNumber;
  struct stat st {};
  struct statfs sfs {};
  std::string bytes;
};

class FsCall : public Napi::AsyncWorker {
 public:
  using Fn = std::function<void(FsResult&)>;
  FsCall(Napi::Env env, const char* syscall, Fn fn)
      : Napi::AsyncWorker(env), deferred_(Napi::Promise::Deferred::New(env)), syscall_(syscall), fn_(std::move(fn)) {}
  Napi::Promise Promise() { return deferred_.Promise(); }
  void Execute() override { fn_(r_); }
  void OnOK() override {
    Napi::Env env = Env();
    if (r_.err) {
      deferred_.Reject(SysError(env, r_.err, syscall_).Value());
      return;
    }
    switch (r_.kind) {
      case FsResult::kNumber:
        deferred_.Resolve(Napi::Number::New(env, r_.value));
        break;
      case FsResult::kBytes:
        deferred_.Resolve(Napi::Buffer<char>::Copy(env, r_.bytes.data(), r_.bytes.size()));
        break;
      case FsResult::kStat: {
        // [value, dev_hi, dev_lo, ino_hi, ino_lo, mode, nlink, uid, gid, rdev, size, blksize,
        //  blocks, atime s, ns, mtime s, ns, ctime s, ns]: dev and ino in 32-bit halves so the
        //  inode table's key is exact even where they exceed 2^53.
        const struct stat& s = r_.st;
        double v[] = {r_.value,
                      static_cast<double>(static_cast<uint64_t>(s.st_dev) >> 32),
                      static_cast<double>(static_cast<uint64_t>(s.st_dev) & 0xffffffffu),
                      static_cast<double>(static_cast<uint64_t>(s.st_ino) >> 32),
                      static_cast<double>(static_cast<uint64_t>(s.st_ino) & 0xffffffffu),
                      static_cast<double>(s.st_mode),
                      static_cast<double>(s.st_nlink),
                      static_cast<double>(s.st_uid),
                      static_cast<double>(s.st_gid),
                      static_cast<double>(s.st_rdev),
                      static_cast<double>(s.st_size),
                      static_cast<double>(s.st_blksize),
                      static_cast<double>(s.st_blocks),
                      static_cast<double>(s.st_atim.tv_sec),
                      static_cast<double>(s.st_atim.tv_nsec),
                      static_cast<double>(s.st_mtim.tv_sec),
                      static_cast<double>(s.st_mtim.tv_nsec),
                      static_cast<double>(s.st_ctim.tv_sec),
                      static_cast<double>(s.st_ctim.tv_nsec)};
        auto arr = Napi::Float64Array::New(env, sizeof v / sizeof v[0]);
        for (size_t i = 0; i < sizeof v / sizeof v[0]; i++) arr[i] = v[i];
        deferred_.Resolve(arr);
        break;
      }
      case FsResult::kStatfs: {
        const struct statfs& f = r_.sfs;
        double v[] = {static_cast<double>(f.f_blocks), static_cast<double>(f.f_bfree),
                      static_cast<double>(f.f_bavail), static_cast<double>(f.f_files),
                      static_cast<double>(f.f_ffree),  static_cast<double>(f.f_bsize),
                      static_cast<double>(f.f_namelen), static_cast<double>(f.f_frsize)};
        auto arr = Napi::Float64Array::New(env, 8);
        for (size_t i = 0; i < 8; i++) arr[i] = v[i];
        deferred_.Resolve(arr);
        break;
      }
    }
  }

 private:
  Napi::Promise::Deferred deferred_;
  const char* syscall_;
  Fn fn_;
  FsResult r_;
};

// ---- argument parsing: a bad argument is a bug in the caller, thrown as a TypeError ----

struct Args {
  const Napi::CallbackInfo& info;
  bool ok = true;
  explicit Args(const Napi::CallbackInfo& i) : info(i) {}
  // An integer in [-2^53, 2^53] (uid/gid -1 mean "leave").
  int64_t Int(size_t i) {
    if (info.Length() <= i || !info[i].IsNumber()) {
      ok = false;
      return 0;
    }
    double d = info[i].As<Napi::Number>().DoubleValue();
    if (!std::isfinite(d) || std::fabs(d) > 9007199254740992.0 || std::floor(d) != d) {
      ok = false;
      return 0;
    }
    return static_cast<int64_t>(d);
  }
  int Fd(size_t i) {
    int64_t v = Int(i);
    if (v < 0 || v > INT32_MAX) ok = false;
    return static_cast<int>(v);
  }
  // Bytes of a Buffer; `name` refuses NUL (a C string would end there) and the empty string.
  std::string Bytes(size_t i, bool name) {
    if (info.Length() <= i || !info[i].IsTypedArray()) {
      ok = false;
      return std::string();
    }
    auto ta = info[i].As<Napi::TypedArray>();
    std::string s(static_cast<const char*>(ta.ArrayBuffer().Data()) + ta.ByteOffset(), ta.ByteLength());
    if (name && (s.empty() || s.find('\0') != std::string::npos)) nul_ = true;
    return s;
  }
  bool nul_ = false;
};

Napi::Value Queue(Napi::Env env, const char* syscall, FsCall::Fn fn) {
  auto* w = new FsCall(env, syscall, std::move(fn));
  Napi::Promise p = w->Promise();
  w->Queue();
  return p;
}

Napi::Value Reject(Napi::Env env, int err, const char* syscall) {
  auto d = Napi::Promise::Deferred::New(env);
  d.Reject(SysError(env, err, syscall).Value());
  return d.Promise();
}

// Checks the arguments; returns false (having thrown or produced a rejected promise in *out).
bool Check(Args& a, const char* syscall, Napi::Value* out) {
  Napi::Env env = a.info.Env();
  if (!a.ok) {
    Napi::TypeError::New(env, std::string("bad arguments to ") + syscall).ThrowAsJavaScriptException();
    *out = env.Undefined();
    return false;
  }
  if (a.nul_) {
    *out = Reject(env, EINVAL, syscall);
    return false;
  }
  return true;
}

std::string ProcPath(int fd) {
  char buf[40];
  snprintf(buf, sizeof buf, "/proc/self/fd/%d", fd);
  return buf;
}

int Openat2(int dirfd, const char* name, int flags, mode_t mode, uint64_t resolve) {
  struct open_how how;
  memset(&how, 0, sizeof how);
  how.flags = static_cast<uint64_t>(flags);
  how.mode = (flags & (O_CREAT | O_TMPFILE)) ? mode : 0;
  how.resolve = resolve;
  long r;
  do {
    r = syscall(SYS_openat2, dirfd, name, &how, sizeof how);
  } while (r < 0 && (errno == EINTR || errno == EAGAIN));
  if (r < 0 && errno == ENOSYS) {
    // Kernels before 5.6: the tree only ever passes one component without '/', and O_NOFOLLOW
    // refuses a symlink in it, which is the same confinement for a single step.
    r = openat(dirfd, name, flags | O_NOFOLLOW, mode);
  }
  return static_cast<int>(r);
}

const uint64_t kResolve = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS;

// fsOpenat(dirfd, name, flags, mode, wantStat, dotdot): openat2 of one component beneath dirfd, with
// O_NOFOLLOW|O_CLOEXEC added. With wantStat the result is the stat array whose [0] is the fd.
Napi::Value Open(const Napi::CallbackInfo& info) {
  Args a(info);
  int dirfd = a.Fd(0);
  std::string name = a.Bytes(1, true);
  int flags = static_cast<int>(a.Int(2));
  mode_t mode = static_cast<mode_t>(a.Int(3));
  bool wantStat = info.Length() > 4 && info[4].ToBoolean();
  // The parent of a directory: ".." can only be resolved without RESOLVE_BENEATH (which is
  // relative to dirfd, not to the share's root); the tree checks the result lies under its root.
  bool dotdot = info.Length() > 5 && info[5].ToBoolean();
  if (dotdot && name != "..") a.ok = false;
  Napi::Value out;
  if (!Check(a, "openat2", &out)) return out;
  return Queue(info.Env(), "openat2", [=](FsResult& r) {
    uint64_t resolve = dotdot ? (RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS) : kResolve;
    int fd = Openat2(dirfd, name.c_str(), flags | O_NOFOLLOW | O_CLOEXEC, mode, resolve);
    if (fd < 0) {
      r.err = errno;
      return;
    }
    r.value = fd;
    if (wantStat) {
      if (fstat(fd, &r.st) < 0) {
        r.err = errno;
        close(fd);
        return;
      }
      r.kind = FsResult::kStat;
    }
  });
}

// fsStat(fd): fstatat(fd, "", AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW), for O_PATH fds too.
Napi::Value Stat(const Napi::CallbackInfo& info) {
  Args a(info);
  int fd = a.Fd(0);
  Napi::Value out;
  if (!Check(a, "fstatat", &out)) return out;
  return Queue(info.Env(), "fstatat", [=](FsResult& r) {
    if (fstatat(fd, "", &r.st, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) < 0) r.err = errno;
    r.kind = FsResult::kStat;
  });
}

// fsReopen(fd, flags): a real open file description of the node an O_PATH fd holds, through
// /proc/self/fd/N as virtiofsd does. A symlink is refused (ELOOP): opening it through the magic
// link would act on the symlink's target, which may be outside the root.
Napi::Value Reopen(const Napi::CallbackInfo& info) {
  Args a(info);
  int fd = a.Fd(0);
  int flags = static_cast<int>(a.Int(1));
  Napi::Value out;
  if (!Check(a, "open", &out)) return out;
  return Queue(info.Env(), "open", [=](FsResult& r) {
    struct stat st;
    if (fstatat(fd, "", &st, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) < 0) {
      r.err = errno;
      return;
    }
    if (S_ISLNK(st.st_mode)) {
      r.err = ELOOP;
      return;
    }
    int f = (flags & ~(O_NOFOLLOW | O_CREAT | O_EXCL | O_TMPFILE)) | O_CLOEXEC;
    int nfd;
    do {
      nfd = open(ProcPath(fd).c_str(), f);
    } while (nfd < 0 && errno == EINTR);
    if (nfd < 0) r.err = errno;
    else r.value = nfd;
  });
}

// fsMkdirat(dirfd, name, mode), fsMknodat(dirfd, name, mode, rdev), fsSymlinkat(target, dirfd,
// name), fsUnlinkat(dirfd, name, flags): one component beneath a held directory fd.
Napi::Value Mkdirat(const Napi::CallbackInfo& info) {
  Args a(info);
  int dirfd = a.Fd(0);
  std::string name = a.Bytes(1, true);
  mode_t mode = static_cast<mode_t>(a.Int(2));
  Napi::Value out;
  if (!Check(a, "mkdirat", &out)) return out;
  return Queue(info.Env(), "mkdirat", [=](FsResult& r) {
    if (mkdirat(dirfd, name.c_str(), mode) < 0) r.err = errno;
  });
}

Napi::Value Mknodat(const Napi::CallbackInfo& info) {
  Args a(info);
  int dirfd = a.Fd(0);
  std::string name = a.Bytes(1, true);
  mode_t mode = static_cast<mode_t>(a.Int(2));
  dev_t rdev = static_cast<dev_t>(a.Int(3));
  Napi::Value out;
  if (!Check(a, "mknodat", &out)) return out;
  return Queue(info.Env(), "mknodat", [=](FsResult& r) {
    if (mknodat(dirfd, name.c_str(), mode, rdev) < 0) r.err = errno;
  });
}

Napi::Value Symlinkat(const Napi::CallbackInfo& info) {
  Args a(info);
  std::string target = a.Bytes(0, true);
  int dirfd = a.Fd(1);
  std::string name = a.Bytes(2, true);
  Napi::Value out;
  if (!Check(a, "symlinkat", &out)) return out;
  return Queue(info.Env(), "symlinkat", [=](FsResult& r) {
    if (symlinkat(target.c_str(), dirfd, name.c_str()) < 0) r.err = errno;
  });
}

Napi::Value Unlinkat(const Napi::CallbackInfo& info) {
  Args a(info);
  int dirfd = a.Fd(0);
  std::string name = a.Bytes(1, true);
  int flags = static_cast<int>(a.Int(2));
  Napi::Value out;
  if (!Check(a, "unlinkat", &out)) return out;
  return Queue(info.Env(), "unlinkat", [=](FsResult& r) {
    if (unlinkat(dirfd, name.c_str(), flags & AT_REMOVEDIR) < 0) r.err = errno;
  });
}

// fsRenameat2(olddirfd, oldname, newdirfd, newname, flags): RENAME_NOREPLACE / RENAME_EXCHANGE.
Napi::Value Renameat2(const Napi::CallbackInfo& info) {
  Args a(info);
  int odfd = a.Fd(0);
  std::string oname = a.Bytes(1, true);
  int ndfd = a.Fd(2);
  std::string nname = a.Bytes(3, true);
  unsigned flags = static_cast<unsigned>(a.Int(4));
  Napi::Value out;
  if (!Check(a, "renameat2", &out)) return out;
  return Queue(info.Env(), "renameat2", [=](FsResult& r) {
    if (syscall(SYS_renameat2, odfd, oname.c_str(), ndfd, nname.c_str(), flags) < 0) r.err = errno;
  });
}

// fsLinkat(fd, newdirfd, newname): a new name for the node an O_PATH fd holds. Through
// /proc/self/fd/N with AT_SYMLINK_FOLLOW (which follows the magic link to exactly that inode,
// a symlink included), as virtiofsd does: AT_EMPTY_PATH would need CAP_DAC_READ_SEARCH.
Napi::Value Linkat(const Napi::CallbackInfo& info) {
  Args a(info);
  int fd = a.Fd(0);
  int ndfd = a.Fd(1);
  std::string nname = a.Bytes(2, true);
  Napi::Value out;
  if (!Check(a, "linkat", &out)) return out;
  return Queue(info.Env(), "linkat", [=](FsResult& r) {
    if (linkat(AT_FDCWD, ProcPath(fd).c_str(), ndfd, nname.c_str(), AT_SYMLINK_FOLLOW) < 0) r.err = errno;
  });
}

// fsReadlink(fd): the target of the symlink an O_PATH fd holds.
Napi::Value Readlink(const Napi::CallbackInfo& info) {
  Args a(info);
  int fd = a.Fd(0);
  Napi::Value out;
  if (!Check(a, "readlinkat", &out)) return out;
  return Queue(info.Env(), "readlinkat", [=](FsResult& r) {
    char buf[PATH_MAX];
    ssize_t n = readlinkat(fd, "", buf, sizeof buf);
    if (n < 0) {
      r.err = errno;
      return;
    }
    r.kind = FsResult::kBytes;
    r.bytes.assign(buf, static_cast<size_t>(n));
  });
}

// fsChown(fd, uid, gid): fchownat(fd, "", AT_EMPTY_PATH|AT_SYMLINK_NOFOLLOW); -1 leaves one.
Napi::Value Chown(const Napi::CallbackInfo& info) {
  Args a(info);
  int fd = a.Fd(0);
  int64_t uid = a.Int(1), gid = a.Int(2);
  Napi::Value out;
  if (!Check(a, "fchownat", &out)) return out;
  return Queue(info.Env(), "fchownat", [=](FsResult& r) {
    if (fchownat(fd, "", static_cast<uid_t>(uid), static_cast<gid_t>(gid), AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) < 0)
      r.err = errno;
  });
}

// fsChmod(fd, mode): fchmod does not take O_PATH fds; the magic link reaches the same inode.
Napi::Value Chmod(const Napi::CallbackInfo& info) {
  Args a(info);
  int fd = a.Fd(0);
  mode_t mode = static_cast<mode_t>(a.Int(1));
  Napi::Value out;
  if (!Check(a, "fchmodat", &out)) return out;
  return Queue(info.Env(), "fchmodat", [=](FsResult& r) {
    if (fchmodat(AT_FDCWD, ProcPath(fd).c_str(), mode, 0) < 0) r.err = errno;
  });
}

// fsUtimens(fd, atimeSec, atimeNsec, mtimeSec, mtimeNsec): nsec UTIME_NOW / UTIME_OMIT allowed.
Napi::Value Utimens(const Napi::CallbackInfo& info) {
  Args a(info);
  int fd = a.Fd(0);
  struct timespec ts[2];
  ts[0].tv_sec = static_cast<time_t>(a.Int(1));
  ts[0].tv_nsec = static_cast<long>(a.Int(2));
  ts[1].tv_sec = static_cast<time_t>(a.Int(3));
  ts[1].tv_nsec = static_cast<long>(a.Int(4));
  Napi::Value out;
  if (!Check(a, "utimensat", &out)) return out;
  return Queue(info.Env(), "utimensat", [=](FsResult& r) {
    if (utimensat(AT_FDCWD, ProcPath(fd).c_str(), ts, 0) < 0) r.err = errno;
  });
}

// fsTruncate(fd, size): truncate of the node an O_PATH fd holds.
Napi::Value Truncate(const Napi::CallbackInfo& info) {
  Args a(info);
  int fd = a.Fd(0);
  int64_t size = a.Int(1);
  Napi::Value out;
  if (!Check(a, "truncate", &out)) return out;
  return Queue(info.Env(), "truncate", [=](FsResult& r) {
    if (truncate(ProcPath(fd).c_str(), static_cast<off_t>(size)) < 0) r.err = errno;
  });
}

// Extended attributes of the node an O_PATH fd holds, through its magic link (f*xattr refuse
// O_PATH fds). Get and list grow their buffer until the value fits (at most XATTR_SIZE_MAX).
template <typename F>
void ReadGrowing(FsResult& r, size_t cap, F call) {
  r.kind = FsResult::kBytes;
  for (;; cap = cap * 4 > 65536 ? 65536 : cap * 4) {
    r.bytes.resize(cap);
    ssize_t n = call(&r.bytes[0], cap);
    if (n >= 0) {
      r.bytes.resize(static_cast<size_t>(n));
      return;
    }
    if (errno != ERANGE || cap >= 65536) {
      r.err = errno;
      return;
    }
  }
}

Napi::Value Getxattr(const Napi::CallbackInfo& info) {
  Args a(info);
  int fd = a.Fd(0);
  std::string name = a.Bytes(1, true);
  Napi::Value out;
  if (!Check(a, "getxattr", &out)) return out;
  return Queue(info.Env(), "getxattr", [=](FsResult& r) {
    std::string p = ProcPath(fd);
    ReadGrowing(r, 256, [&](char* buf, size_t cap) { return getxattr(p.c_str(), name.c_str(), buf, cap); });
  });
}

Napi::Value Listxattr(const Napi::CallbackInfo& info) {
  Args a(info);
  int fd = a.Fd(0);
  Napi::Value out;
  if (!Check(a, "listxattr", &out)) return out;
  return Queue(info.Env(), "listxattr", [=](FsResult& r) {
    std::string p = ProcPath(fd);
    ReadGrowing(r, 1024, [&](char* buf, size_t cap) { return listxattr(p.c_str(), buf, cap); });
  });
}

Napi::Value Setxattr(const Napi::CallbackInfo& info) {
  Args a(info);
  int fd = a.Fd(0);
  std::string name = a.Bytes(1, true);
  std::string value = a.Bytes(2, false);
  int flags = static_cast<int>(a.Int(3));
  Napi::Value out;
  if (!Check(a, "setxattr", &out)) return out;
  return Queue(info.Env(), "setxattr", [=](FsResult& r) {
    if (setxattr(ProcPath(fd).c_str(), name.c_str(), value.data(), value.size(), flags) < 0) r.err = errno;
  });
}

Napi::Value Removexattr(const Napi::CallbackInfo& info) {
  Args a(info);
  int fd = a.Fd(0);
  std::string name = a.Bytes(1, true);
  Napi::Value out;
  if (!Check(a, "removexattr", &out)) return out;
  return Queue(info.Env(), "removexattr", [=](FsResult& r) {
    if (removexattr(ProcPath(fd).c_str(), name.c_str()) < 0) r.err = errno;
  });
}

// fsGetdents(fd, cookie: bigint, size): lseek(fd, cookie) then one getdents64 of at most `size`
// bytes of raw linux_dirent64 records (parsed in TypeScript). The cookie is the d_off of the
// entry before: the filesystem's own stable position (a 63-bit hash on ext4, hence a bigint),
// so a listing continued after creates and deletes neither skips nor repeats survivors.
Napi::Value Getdents(const Napi::CallbackInfo& info) {
  Args a(info);
  int fd = a.Fd(0);
  bool lossless = true;
  int64_t cookie = 0;
  if (info.Length() > 1 && info[1].IsBigInt()) cookie = info[1].As<Napi::BigInt>().Int64Value(&lossless);
  else a.ok = false;
  int64_t size = a.Int(2);
  if (!lossless || size <= 0 || size > (1 << 20)) a.ok = false;
  Napi::Value out;
  if (!Check(a, "getdents64", &out)) return out;
  return Queue(info.Env(), "getdents64", [=](FsResult& r) {
    r.kind = FsResult::kBytes;
    if (lseek(fd, static_cast<off_t>(cookie), SEEK_SET) < 0) {
      r.err = errno;
      return;
    }
    r.bytes.resize(static_cast<size_t>(size));
    long n;
    do {
      n = syscall(SYS_getdents64, fd, &r.bytes[0], static_cast<size_t>(size));
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
      r.err = errno;
      return;
    }
    r.bytes.resize(static_cast<size_t>(n));
  });
}

// fsFallocate(fd, mode, offset, length), fsLseek(fd, offset, whence) -> offset,
// fsCopyFileRange(fdIn, offIn, fdOut, offOut, length, flags) -> bytes, fsSyncfs(fd),
// fsStatfs(fd) -> [blocks, bfree, bavail, files, ffree, bsize, namelen, frsize].
Napi::Value Fallocate(const Napi::CallbackInfo& info) {
  Args a(info);
  int fd = a.Fd(0);
  int mode = static_cast<int>(a.Int(1));
  int64_t off = a.Int(2), len = a.Int(3);
  Napi::Value out;
  if (!Check(a, "fallocate", &out)) return out;
  return Queue(info.Env(), "fallocate", [=](FsResult& r) {
    int x;
    do {
      x = fallocate(fd, mode, static_cast<off_t>(off), static_cast<off_t>(len));
    } while (x < 0 && errno == EINTR);
    if (x < 0) r.err = errno;
  });
}

Napi::Value Lseek(const Napi::CallbackInfo& info) {
  Args a(info);
  int fd = a.Fd(0);
  int64_t off = a.Int(1);
  int whence = static_cast<int>(a.Int(2));
  Napi::Value out;
  if (!Check(a, "lseek", &out)) return out;
  return Queue(info.Env(), "lseek", [=](FsResult& r) {
    off_t x = lseek(fd, static_cast<off_t>(off), whence);
    if (x < 0) r.err = errno;
    else r.value = static_cast<double>(x);
  });
}

Napi::Value CopyFileRange(const Napi::CallbackInfo& info) {
  Args a(info);
  int fdIn = a.Fd(0);
  int64_t offIn = a.Int(1);
  int fdOut = a.Fd(2);
  int64_t offOut = a.Int(3);
  int64_t len = a.Int(4);
  unsigned flags = static_cast<unsigned>(a.Int(5));
  if (offIn < 0 || offOut < 0 || len < 0) a.ok = false;
  Napi::Value out;
  if (!Check(a, "copy_file_range", &out)) return out;
  return Queue(info.Env(), "copy_file_range", [=](FsResult& r) {
    loff_t i = offIn, o = offOut;
    ssize_t n;
    do {
      n = copy_file_range(fdIn, &i, fdOut, &o, static_cast<size_t>(len), flags);
    } while (n < 0 && errno == EINTR);
    if (n < 0) r.err = errno;
    else r.value = static_cast<double>(n);
  });
}

Napi::Value Syncfs(const Napi::CallbackInfo& info) {
  Args a(info);
  int fd = a.Fd(0);
  Napi::Value out;
  if (!Check(a, "syncfs", &out)) return out;
  return Queue(info.Env(), "syncfs", [=](FsResult& r) {
    if (syncfs(fd) < 0) r.err = errno;
  });
}

Napi::Value Statfs(const Napi::CallbackInfo& info) {
  Args a(info);
  int fd = a.Fd(0);
  Napi::Value out;
  if (!Check(a, "fstatfs", &out)) return out;
  return Queue(info.Env(), "fstatfs", [=](FsResult& r) {
    r.kind = FsResult::kStatfs;
    if (fstatfs(fd, &r.sfs) < 0) r.err = errno;
  });
}

}  // namespace

void InitFs(Napi::Env env, Napi::Object exports) {
  exports.Set("fsOpenat", Napi::Function::New(env, Open, "fsOpenat"));
  exports.Set("fsStat", Napi::Function::New(env, Stat, "fsStat"));
  exports.Set("fsReopen", Napi::Function::New(env, Reopen, "fsReopen"));
  exports.Set("fsMkdirat", Napi::Function::New(env, Mkdirat, "fsMkdirat"));
  exports.Set("fsMknodat", Napi::Function::New(env, Mknodat, "fsMknodat"));
  exports.Set("fsSymlinkat", Napi::Function::New(env, Symlinkat, "fsSymlinkat"));
  exports.Set("fsUnlinkat", Napi::Function::New(env, Unlinkat, "fsUnlinkat"));
  exports.Set("fsRenameat2", Napi::Function::New(env, Renameat2, "fsRenameat2"));
  exports.Set("fsLinkat", Napi::Function::New(env, Linkat, "fsLinkat"));
  exports.Set("fsReadlink", Napi::Function::New(env, Readlink, "fsReadlink"));
  exports.Set("fsChown", Napi::Function::New(env, Chown, "fsChown"));
  exports.Set("fsChmod", Napi::Function::New(env, Chmod, "fsChmod"));
  exports.Set("fsUtimens", Napi::Function::New(env, Utimens, "fsUtimens"));
  exports.Set("fsTruncate", Napi::Function::New(env, Truncate, "fsTruncate"));
  exports.Set("fsGetxattr", Napi::Function::New(env, Getxattr, "fsGetxattr"));
  exports.Set("fsListxattr", Napi::Function::New(env, Listxattr, "fsListxattr"));
  exports.Set("fsSetxattr", Napi::Function::New(env, Setxattr, "fsSetxattr"));
  exports.Set("fsRemovexattr", Napi::Function::New(env, Removexattr, "fsRemovexattr"));
  exports.Set("fsGetdents", Napi::Function::New(env, Getdents, "fsGetdents"));
  exports.Set("fsFallocate", Napi::Function::New(env, Fallocate, "fsFallocate"));
  exports.Set("fsLseek", Napi::Function::New(env, Lseek, "fsLseek"));
  exports.Set("fsCopyFileRange", Napi::Function::New(env, CopyFileRange, "fsCopyFileRange"));
  exports.Set("fsSyncfs", Napi::Function::New(env, Syncfs, "fsSyncfs"));
  exports.Set("fsStatfs", Napi::Function::New(env, Statfs, "fsStatfs"));
}

}  // namespace vstore
