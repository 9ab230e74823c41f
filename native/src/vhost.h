// vhost-user plumbing that JavaScript cannot do: unix sockets with SCM_RIGHTS, eventfds and fd
// readiness in the libuv loop, and shared mappings of guest memory exposed as ArrayBuffers.
#pragma once
#include <napi.h>

namespace vstore {
void InitVhost(Napi::Env env, Napi::Object exports);
}
