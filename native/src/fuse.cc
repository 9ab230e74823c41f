// mount(2) / umount2(2) (as root), and a socketpair + O_NONBLOCK for the fusermount3 way (not root),
// for `vstore mount` (lib/fuse/devfuse.ts). Thin wrappers: the options
// string (fd=N,rootmode=...,user_id=...) is built in TypeScript; errors are Node-style system
// errors (.code, .errno, .syscall).
#include "fuse.h"

#include "syserr.h"

#include <cerrno>
#include <string>
#include <fcntl.h>
#include <sys/mount.h>
#include <sys/socket.h>

namespace vstore {
namespace {

// fuseMount(source, target, fstype, flags, data): mount(2). Throws a system error.
Napi::Value FuseMount(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 5 || !info[0].IsString() || !info[1].IsString() || !info[2].IsString() || !info[3].IsNumber() ||
      !info[4].IsString()) {
    Napi::TypeError::New(env, "fuseMount(source, target, fstype, flags, data)").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  std::string source = info[0].As<Napi::String>();
  std::string target = info[1].As<Napi::String>();
  std::string fstype = info[2].As<Napi::String>();
  unsigned long flags = static_cast<unsigned long>(info[3].As<Napi::Number>().Int64Value());
  std::string data = info[4].As<Napi::String>();
  if (mount(source.c_str(), target.c_str(), fstype.c_str(), flags, data.c_str()) != 0) {
    SysError(env, errno, "mount").ThrowAsJavaScriptException();
  }
  return env.Undefined();
}

// fuseUnmount(target, flags): umount2(2) on the thread pool -> Promise (rejects with a system
// error: EINVAL not mounted, EBUSY). Never on the event loop: an unmount may wait for the
// filesystem (writeback of pages a mapping dirtied), and the filesystem is served by that loop.
class UnmountWorker : public Napi::AsyncWorker {
 public:
  UnmountWorker(Napi::Env env, std::string target, int flags)
      : Napi::AsyncWorker(env), deferred_(Napi::Promise::Deferred::New(env)), target_(std::move(target)), flags_(flags) {}
  Napi::Promise Promise() { return deferred_.Promise(); }
  void Execute() override { err_ = umount2(target_.c_str(), flags_) != 0 ? errno : 0; }
  void OnOK() override {
    Napi::Env env = Env();
    if (err_) deferred_.Reject(SysError(env, err_, "umount2").Value());
    else deferred_.Resolve(env.Undefined());
  }

 private:
  Napi::Promise::Deferred deferred_;
  std::string target_;
  int flags_;
  int err_ = 0;
};

Napi::Value FuseUnmount(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 2 || !info[0].IsString() || !info[1].IsNumber()) {
    Napi::TypeError::New(env, "fuseUnmount(target, flags)").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  auto* w = new UnmountWorker(env, info[0].As<Napi::String>(), info[1].As<Napi::Number>().Int32Value());
  Napi::Promise p = w->Promise();
  w->Queue();
  return p;
}

// fuseSocketPair(): a connected AF_UNIX SOCK_STREAM pair [ours, theirs], close-on-exec; `theirs`
// goes to fusermount3 as _FUSE_COMMFD (spawn dups it into the child without the flag).
Napi::Value FuseSocketPair(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fds[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) {
    SysError(env, errno, "socketpair").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  Napi::Array out = Napi::Array::New(env, 2);
  out.Set(0u, Napi::Number::New(env, fds[0]));
  out.Set(1u, Napi::Number::New(env, fds[1]));
  return out;
}

// fuseSetNonBlocking(fd): O_NONBLOCK on an fd we were handed (the /dev/fuse fd from fusermount3).
Napi::Value FuseSetNonBlocking(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsNumber()) {
    Napi::TypeError::New(env, "fuseSetNonBlocking(fd)").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  int fd = info[0].As<Napi::Number>().Int32Value();
  int fl = fcntl(fd, F_GETFL);
  if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) != 0) SysError(env, errno, "fcntl").ThrowAsJavaScriptException();
  return env.Undefined();
}

}  // namespace

void InitFuse(Napi::Env env, Napi::Object exports) {
  exports.Set("fuseMount", Napi::Function::New(env, FuseMount, "fuseMount"));
  exports.Set("fuseUnmount", Napi::Function::New(env, FuseUnmount, "fuseUnmount"));
  exports.Set("fuseSocketPair", Napi::Function::New(env, FuseSocketPair, "fuseSocketPair"));
  exports.Set("fuseSetNonBlocking", Napi::Function::New(env, FuseSetNonBlocking, "fuseSetNonBlocking"));
}

}  // namespace vstore
