// mount(2) / umount2(2) for `vstore mount` (lib/fuse/devfuse.ts). Thin wrappers: the options
// string (fd=N,rootmode=...,user_id=...) is built in TypeScript; errors are Node-style system
// errors (.code, .errno, .syscall).
#include "fuse.h"

#include "syserr.h"

#include <cerrno>
#include <string>
#include <sys/mount.h>

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

// fuseUnmount(target, flags): umount2(2). Throws a system error (EINVAL: not mounted; EBUSY).
Napi::Value FuseUnmount(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 2 || !info[0].IsString() || !info[1].IsNumber()) {
    Napi::TypeError::New(env, "fuseUnmount(target, flags)").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  std::string target = info[0].As<Napi::String>();
  if (umount2(target.c_str(), info[1].As<Napi::Number>().Int32Value()) != 0) {
    SysError(env, errno, "umount2").ThrowAsJavaScriptException();
  }
  return env.Undefined();
}

}  // namespace

void InitFuse(Napi::Env env, Napi::Object exports) {
  exports.Set("fuseMount", Napi::Function::New(env, FuseMount, "fuseMount"));
  exports.Set("fuseUnmount", Napi::Function::New(env, FuseUnmount, "fuseUnmount"));
}

}  // namespace vstore
