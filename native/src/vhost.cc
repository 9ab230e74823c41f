// vhost-user plumbing: unix sockets with SCM_RIGHTS, eventfds, fd readiness in the libuv loop,
// memfds, and shared mappings of guest memory exposed as ArrayBuffers without a copy.
//
// Policy (message framing, rings, devices) lives in TypeScript (lib/vhost/). Every function
// here is a thin syscall wrapper that validates its arguments and throws a Node-style system
// error (.code, .errno, .syscall) on failure; it never aborts the process.
#include "vhost.h"

#include "syserr.h"

#include <cerrno>
#include <cmath>
#include <cstring>
#include <fcntl.h>
#include <poll.h>
#include <string>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>
#include <uv.h>

namespace vstore {
namespace {

// Largest number of fds accepted with one message (vhost-user sends at most 8, the memory table).
constexpr int kMaxFds = 32;

Napi::Value Throw(Napi::Env env, int err, const char* syscall) {
  SysError(env, err, syscall).ThrowAsJavaScriptException();
  return env.Undefined();
}

Napi::Value TypeErr(Napi::Env env, const char* msg) {
  Napi::TypeError::New(env, msg).ThrowAsJavaScriptException();
  return env.Undefined();
}

bool ArgU64(const Napi::CallbackInfo& info, size_t i, uint64_t* out) {
  if (info.Length() <= i || !info[i].IsNumber()) return false;
  double d = info[i].As<Napi::Number>().DoubleValue();
  if (!std::isfinite(d) || d < 0 || d > 9007199254740991.0 || std::floor(d) != d) return false;
  *out = static_cast<uint64_t>(d);
  return true;
}

bool ArgFd(const Napi::CallbackInfo& info, size_t i, int* out) {
  uint64_t v;
  if (!ArgU64(info, i, &v) || v > 0x7fffffff) return false;
  *out = static_cast<int>(v);
  return true;
}

// A Uint8Array (or Buffer) argument: its bytes, without a copy.
bool ArgBytes(const Napi::CallbackInfo& info, size_t i, uint8_t** data, size_t* len) {
  if (info.Length() <= i || !info[i].IsTypedArray()) return false;
  Napi::TypedArray ta = info[i].As<Napi::TypedArray>();
  if (ta.TypedArrayType() != napi_uint8_array) return false;
  Napi::Uint8Array u8 = ta.As<Napi::Uint8Array>();
  *data = u8.Data();
  *len = u8.ByteLength();
  return true;
}

bool FillSockaddr(const std::string& path, sockaddr_un* sa) {
  memset(sa, 0, sizeof(*sa));
  sa->sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(sa->sun_path)) return false;
  memcpy(sa->sun_path, path.data(), path.size());
  return true;
}

// unixListen(path, backlog): a non-blocking listening SOCK_STREAM socket bound to `path`
// (an existing socket file is not removed: the caller decides).
Napi::Value UnixListen(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint64_t backlog = 16;
  if (info.Length() < 1 || !info[0].IsString()) return TypeErr(env, "expected (path, backlog?)");
  if (info.Length() > 1 && !ArgU64(info, 1, &backlog)) return TypeErr(env, "backlog must be a non-negative integer");
  sockaddr_un sa;
  if (!FillSockaddr(info[0].As<Napi::String>().Utf8Value(), &sa)) return Throw(env, ENAMETOOLONG, "bind");
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return Throw(env, errno, "socket");
  if (bind(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) < 0 || listen(fd, static_cast<int>(backlog)) < 0) {
    int err = errno;
    close(fd);
    return Throw(env, err, "bind/listen");
  }
  return Napi::Number::New(env, fd);
}

// unixConnect(path): a connected SOCK_STREAM socket, non-blocking once connected.
Napi::Value UnixConnect(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsString()) return TypeErr(env, "expected (path)");
  sockaddr_un sa;
  if (!FillSockaddr(info[0].As<Napi::String>().Utf8Value(), &sa)) return Throw(env, ENAMETOOLONG, "connect");
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return Throw(env, errno, "socket");
  int r;
  do {
    r = connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa));
  } while (r < 0 && errno == EINTR);
  if (r < 0) {
    int err = errno;
    close(fd);
    return Throw(env, err, "connect");
  }
  int fl = fcntl(fd, F_GETFL);
  fcntl(fd, F_SETFL, fl | O_NONBLOCK);
  return Napi::Number::New(env, fd);
}

// unixAccept(listenFd): a new non-blocking connection fd, or -1 when none is pending.
Napi::Value UnixAccept(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int lfd;
  if (!ArgFd(info, 0, &lfd)) return TypeErr(env, "expected (fd)");
  int fd;
  do {
    fd = accept4(lfd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ECONNABORTED) return Napi::Number::New(env, -1);
    return Throw(env, errno, "accept4");
  }
  return Napi::Number::New(env, fd);
}

// peerCred(fd): [pid, uid, gid] of the process at the other end of a connected unix socket
// (SO_PEERCRED, as it was when that process connected). Short-circuit reads (lib/node/
// shortcircuit.ts) hand a volume's descriptor only to a peer of the node's own uid.
Napi::Value PeerCred(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!ArgFd(info, 0, &fd)) return TypeErr(env, "expected (fd)");
  struct ucred cred;
  socklen_t len = sizeof(cred);
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) return Throw(env, errno, "getsockopt");
  Napi::Array out = Napi::Array::New(env, 3);
  out.Set(uint32_t(0), Napi::Number::New(env, cred.pid));
  out.Set(uint32_t(1), Napi::Number::New(env, cred.uid));
  out.Set(uint32_t(2), Napi::Number::New(env, cred.gid));
  return out;
}

// recvMsg(fd, buf, fdsOut): recvmsg into buf (at most buf.length bytes). Returns the byte
// count (0 at end of stream) or -1 when nothing is ready (EAGAIN). File descriptors that came
// with the bytes (SCM_RIGHTS, received close-on-exec) are pushed onto the array fdsOut; the
// caller owns them. A truncated control message closes what arrived and fails with EMSGSIZE.
Napi::Value RecvMsg(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  uint8_t* data;
  size_t len;
  if (!ArgFd(info, 0, &fd) || !ArgBytes(info, 1, &data, &len) || info.Length() < 3 || !info[2].IsArray()) {
    return TypeErr(env, "expected (fd, Uint8Array, fdsOut: number[])");
  }
  Napi::Array out = info[2].As<Napi::Array>();
  iovec iov{data, len};
  alignas(cmsghdr) char cbuf[CMSG_SPACE(sizeof(int) * kMaxFds)];
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = cbuf;
  msg.msg_controllen = sizeof(cbuf);
  ssize_t n;
  do {
    n = recvmsg(fd, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
  } while (n < 0 && errno == EINTR);
  if (n < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) return Napi::Number::New(env, -1);
    return Throw(env, errno, "recvmsg");
  }
  uint32_t k = out.Length();
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    size_t nfd = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    int* fds = reinterpret_cast<int*>(CMSG_DATA(c));
    for (size_t j = 0; j < nfd; j++) {
      int v;
      memcpy(&v, fds + j, sizeof(int));
      if (msg.msg_flags & MSG_CTRUNC) {
        close(v);
      } else {
        out.Set(k++, Napi::Number::New(env, v));
      }
    }
  }
  if (msg.msg_flags & MSG_CTRUNC) {
    for (uint32_t j = 0; j < k; j++) close(out.Get(j).As<Napi::Number>().Int32Value());
    return Throw(env, EMSGSIZE, "recvmsg(SCM_RIGHTS truncated)");
  }
  return Napi::Number::New(env, static_cast<double>(n));
}

// sendMsg(fd, buf, fds?, waitMs = 0): sends all of buf, the fds (SCM_RIGHTS) with its first
// byte. Control messages are small: when the socket buffer is full it waits up to waitMs (poll)
// for room, then fails with EAGAIN — a peer that does not read its replies is not allowed to
// stall the event loop (the back end passes 0 and closes such a connection). Returns the byte count.
Napi::Value SendMsg(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  uint8_t* data;
  size_t len;
  if (!ArgFd(info, 0, &fd) || !ArgBytes(info, 1, &data, &len)) return TypeErr(env, "expected (fd, Uint8Array, fds?)");
  int fds[kMaxFds];
  size_t nfd = 0;
  if (info.Length() > 2 && !info[2].IsUndefined()) {
    if (!info[2].IsArray()) return TypeErr(env, "fds must be an array");
    Napi::Array a = info[2].As<Napi::Array>();
    if (a.Length() > kMaxFds) return TypeErr(env, "too many fds");
    for (uint32_t j = 0; j < a.Length(); j++) {
      Napi::Value v = a.Get(j);
      if (!v.IsNumber()) return TypeErr(env, "fds must be numbers");
      int32_t f = v.As<Napi::Number>().Int32Value();
      if (f < 0) return TypeErr(env, "fds must be non-negative");
      fds[nfd++] = f;
    }
  }
  uint64_t waitMs = 0;
  if (info.Length() > 3 && !info[3].IsUndefined() && !ArgU64(info, 3, &waitMs)) return TypeErr(env, "waitMs must be a non-negative integer");
  size_t sent = 0;
  bool first = true;
  while (sent < len || first) {
    iovec iov{data + sent, len - sent};
    alignas(cmsghdr) char cbuf[CMSG_SPACE(sizeof(int) * kMaxFds)];
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    if (first && nfd > 0) {
      memset(cbuf, 0, sizeof(cbuf));
      msg.msg_control = cbuf;
      msg.msg_controllen = CMSG_SPACE(sizeof(int) * nfd);
      cmsghdr* c = CMSG_FIRSTHDR(&msg);
      c->cmsg_level = SOL_SOCKET;
      c->cmsg_type = SCM_RIGHTS;
      c->cmsg_len = CMSG_LEN(sizeof(int) * nfd);
      memcpy(CMSG_DATA(c), fds, sizeof(int) * nfd);
    }
    ssize_t n = sendmsg(fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        pollfd p{fd, POLLOUT, 0};
        int r = waitMs > 0 ? poll(&p, 1, static_cast<int>(waitMs > 60000 ? 60000 : waitMs)) : 0;
        if (r == 0) return Throw(env, EAGAIN, "sendmsg(peer not reading)");
        continue;
      }
      return Throw(env, errno, "sendmsg");
    }
    first = false;
    sent += static_cast<size_t>(n);
    if (len == 0) break;
  }
  return Napi::Number::New(env, static_cast<double>(sent));
}

// eventfd(): a non-blocking, close-on-exec eventfd with counter 0.
Napi::Value EventFd(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (fd < 0) return Throw(env, errno, "eventfd");
  return Napi::Number::New(env, fd);
}

// eventfdRead(fd): the counter (reset to 0), or 0 when it was already 0 (EAGAIN).
Napi::Value EventFdRead(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!ArgFd(info, 0, &fd)) return TypeErr(env, "expected (fd)");
  uint64_t v = 0;
  ssize_t n;
  do {
    n = read(fd, &v, sizeof(v));
  } while (n < 0 && errno == EINTR);
  if (n < 0) {
    if (errno == EAGAIN) return Napi::Number::New(env, 0);
    return Throw(env, errno, "read(eventfd)");
  }
  return Napi::Number::New(env, static_cast<double>(v));
}

// eventfdWrite(fd, value = 1): adds to the counter (signals the reader). A full counter (EAGAIN)
// already means "signalled": it is not an error.
Napi::Value EventFdWrite(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  uint64_t v = 1;
  if (!ArgFd(info, 0, &fd)) return TypeErr(env, "expected (fd, value?)");
  if (info.Length() > 1 && !info[1].IsUndefined() && !ArgU64(info, 1, &v)) return TypeErr(env, "bad value");
  ssize_t n;
  do {
    n = write(fd, &v, sizeof(v));
  } while (n < 0 && errno == EINTR);
  if (n < 0 && errno != EAGAIN) return Throw(env, errno, "write(eventfd)");
  return env.Undefined();
}

// memfdCreate(name, size): a sealed-size-free memfd of `size` bytes (guest RAM of a test front end).
Napi::Value MemfdCreate(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint64_t size;
  if (info.Length() < 2 || !info[0].IsString() || !ArgU64(info, 1, &size)) return TypeErr(env, "expected (name, size)");
  std::string name = info[0].As<Napi::String>().Utf8Value();
  int fd = memfd_create(name.c_str(), MFD_CLOEXEC);
  if (fd < 0) return Throw(env, errno, "memfd_create");
  if (ftruncate(fd, static_cast<off_t>(size)) < 0) {
    int err = errno;
    close(fd);
    return Throw(env, err, "ftruncate");
  }
  return Napi::Number::New(env, fd);
}

// fdSize(fd): st_size (to check a region against the file that backs it).
Napi::Value FdSize(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!ArgFd(info, 0, &fd)) return TypeErr(env, "expected (fd)");
  struct stat st;
  if (fstat(fd, &st) < 0) return Throw(env, errno, "fstat");
  return Napi::Number::New(env, static_cast<double>(st.st_size));
}

Napi::Value CloseFd(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!ArgFd(info, 0, &fd)) return TypeErr(env, "expected (fd)");
  if (close(fd) < 0 && errno != EINTR) return Throw(env, errno, "close");
  return env.Undefined();
}

// A shared mapping, unmapped when the last ArrayBuffer over it is garbage-collected: a view of
// guest memory handed to an in-flight I/O stays valid even after the front end removes the
// region (the pages are the guest's; writing them late is what a slow device does anyway).
struct Mapping {
  void* base;
  size_t len;
  int refs;
};

void ReleaseChunk(Napi::Env /*env*/, void* /*data*/, Mapping* m) {
  if (--m->refs == 0) {
    munmap(m->base, m->len);
    delete m;
  }
}

// mmapShared(fd, offset, size, chunkSize, readOnly?): maps [offset, offset + size) of fd
// MAP_SHARED and returns it as ArrayBuffers of at most chunkSize bytes each (in order), without
// a copy. The fd can be closed afterwards. `offset` need not be page-aligned (vhost-user's
// mmap_offset): the mapping starts at the page below it.
Napi::Value MmapShared(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  uint64_t off, size, chunk;
  if (!ArgFd(info, 0, &fd) || !ArgU64(info, 1, &off) || !ArgU64(info, 2, &size) || !ArgU64(info, 3, &chunk)) {
    return TypeErr(env, "expected (fd, offset, size, chunkSize, readOnly?)");
  }
  bool ro = info.Length() > 4 && info[4].ToBoolean().Value();
  if (size == 0 || chunk == 0) return Throw(env, EINVAL, "mmap");
  uint64_t page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  uint64_t start = off - off % page;
  uint64_t skip = off - start;
  if (size > (1ull << 48) || skip + size < size) return Throw(env, EOVERFLOW, "mmap");
  size_t maplen = static_cast<size_t>(skip + size);
  void* p = mmap(nullptr, maplen, ro ? PROT_READ : PROT_READ | PROT_WRITE, MAP_SHARED, fd, static_cast<off_t>(start));
  if (p == MAP_FAILED) return Throw(env, errno, "mmap");
  auto* m = new Mapping{p, maplen, 0};
  uint64_t n = (size + chunk - 1) / chunk;
  Napi::Array arr = Napi::Array::New(env, n);
  for (uint64_t i = 0; i < n; i++) {
    uint64_t len = (i + 1 == n) ? size - i * chunk : chunk;
    uint8_t* at = static_cast<uint8_t*>(p) + skip + i * chunk;
    m->refs++;
    Napi::ArrayBuffer ab = Napi::ArrayBuffer::New(env, at, static_cast<size_t>(len), ReleaseChunk, m);
    if (env.IsExceptionPending()) {
      // Chunks created so far release the mapping when collected; this one never took it.
      if (--m->refs == 0) {
        munmap(p, maplen);
        delete m;
      }
      return env.Undefined();
    }
    arr.Set(static_cast<uint32_t>(i), ab);
  }
  return arr;
}

// FdWatcher: readiness of one fd in the libuv loop (uv_poll), calling back into JavaScript.
// With `eventfd: true` the watcher drains the eventfd counter itself and calls back only when
// it was non-zero, so a kick costs one crossing into JavaScript. close() stops watching; the
// fd stays open (its owner closes it after close()).
class FdWatcher : public Napi::ObjectWrap<FdWatcher> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "FdWatcher",
                       {InstanceMethod("start", &FdWatcher::Start), InstanceMethod("stop", &FdWatcher::Stop),
                        InstanceMethod("close", &FdWatcher::Close)});
  }

  FdWatcher(const Napi::CallbackInfo& info) : Napi::ObjectWrap<FdWatcher>(info) {
    Napi::Env env = info.Env();
    if (!ArgFd(info, 0, &fd_) || info.Length() < 2 || !info[1].IsFunction()) {
      Napi::TypeError::New(env, "expected (fd, callback(status, events), opts?)").ThrowAsJavaScriptException();
      return;
    }
    if (info.Length() > 2 && info[2].IsObject()) {
      eventfd_ = info[2].As<Napi::Object>().Get("eventfd").ToBoolean().Value();
    }
    cb_ = Napi::Persistent(info[1].As<Napi::Function>());
    ctx_ = std::make_unique<Napi::AsyncContext>(env, "vstore.FdWatcher");
    uv_loop_t* loop = nullptr;
    if (napi_get_uv_event_loop(env, &loop) != napi_ok || loop == nullptr) {
      Napi::Error::New(env, "no event loop").ThrowAsJavaScriptException();
      return;
    }
    poll_ = new uv_poll_t;
    int r = uv_poll_init(loop, poll_, fd_);
    if (r != 0) {
      delete poll_;
      poll_ = nullptr;
      Napi::Error::New(env, std::string("uv_poll_init: ") + uv_strerror(r)).ThrowAsJavaScriptException();
      return;
    }
    poll_->data = this;
  }

  ~FdWatcher() override { CloseHandle(); }

 private:
  // start(writable = false): watch for readability (and writability when asked).
  Napi::Value Start(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (poll_ == nullptr) return Throw(env, EBADF, "uv_poll_start");
    int ev = UV_READABLE | UV_DISCONNECT;
    if (info.Length() > 0 && info[0].ToBoolean().Value()) ev |= UV_WRITABLE;
    int r = uv_poll_start(poll_, ev, OnPoll);
    if (r != 0) {
      Napi::Error::New(env, std::string("uv_poll_start: ") + uv_strerror(r)).ThrowAsJavaScriptException();
      return env.Undefined();
    }
    if (!active_) {
      active_ = true;
      Ref();  // an active watcher is not collected
    }
    return env.Undefined();
  }

  Napi::Value Stop(const Napi::CallbackInfo& info) {
    if (poll_ != nullptr) uv_poll_stop(poll_);
    Deactivate();
    return info.Env().Undefined();
  }

  Napi::Value Close(const Napi::CallbackInfo& info) {
    CloseHandle();
    Deactivate();
    return info.Env().Undefined();
  }

  void Deactivate() {
    if (active_) {
      active_ = false;
      Unref();
    }
  }

  void CloseHandle() {
    if (poll_ == nullptr) return;
    uv_poll_stop(poll_);
    poll_->data = nullptr;
    uv_close(reinterpret_cast<uv_handle_t*>(poll_), [](uv_handle_t* h) { delete reinterpret_cast<uv_poll_t*>(h); });
    poll_ = nullptr;
  }

  static void OnPoll(uv_poll_t* h, int status, int events) {
    auto* self = static_cast<FdWatcher*>(h->data);
    if (self != nullptr) self->Fire(status, events);
  }

  void Fire(int status, int events) {
    if (eventfd_ && status == 0 && (events & UV_READABLE)) {
      uint64_t v = 0;
      ssize_t n;
      do {
        n = read(fd_, &v, sizeof(v));
      } while (n < 0 && errno == EINTR);
      if (n < 0 && errno == EAGAIN) return;  // spurious wakeup
      if (n < 0) status = -errno;
    }
    Napi::Env env = Env();
    Napi::HandleScope scope(env);
    cb_.MakeCallback(Value(), {Napi::Number::New(env, status), Napi::Number::New(env, events)}, *ctx_);
    if (env.IsExceptionPending()) {
      Napi::Error e = env.GetAndClearPendingException();
      napi_fatal_exception(env, e.Value());
    }
  }

  int fd_ = -1;
  bool eventfd_ = false;
  bool active_ = false;
  uv_poll_t* poll_ = nullptr;
  Napi::FunctionReference cb_;
  std::unique_ptr<Napi::AsyncContext> ctx_;
};

}  // namespace

void InitVhost(Napi::Env env, Napi::Object exports) {
  exports.Set("unixListen", Napi::Function::New(env, UnixListen, "unixListen"));
  exports.Set("unixConnect", Napi::Function::New(env, UnixConnect, "unixConnect"));
  exports.Set("unixAccept", Napi::Function::New(env, UnixAccept, "unixAccept"));
  exports.Set("recvMsg", Napi::Function::New(env, RecvMsg, "recvMsg"));
  exports.Set("peerCred", Napi::Function::New(env, PeerCred, "peerCred"));
  exports.Set("sendMsg", Napi::Function::New(env, SendMsg, "sendMsg"));
  exports.Set("eventfd", Napi::Function::New(env, EventFd, "eventfd"));
  exports.Set("eventfdRead", Napi::Function::New(env, EventFdRead, "eventfdRead"));
  exports.Set("eventfdWrite", Napi::Function::New(env, EventFdWrite, "eventfdWrite"));
  exports.Set("memfdCreate", Napi::Function::New(env, MemfdCreate, "memfdCreate"));
  exports.Set("fdSize", Napi::Function::New(env, FdSize, "fdSize"));
  exports.Set("closeFd", Napi::Function::New(env, CloseFd, "closeFd"));
  exports.Set("mmapShared", Napi::Function::New(env, MmapShared, "mmapShared"));
  exports.Set("FdWatcher", FdWatcher::Define(env));
}

}  // namespace vstore
