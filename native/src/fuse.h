// The host mount of a FUSE filesystem (lib/fuse/devfuse.ts): mount(2) and umount2(2), which
// Node cannot call. Reading and writing /dev/fuse is plain fs I/O in JavaScript.
#pragma once
#include <napi.h>

namespace vstore {
void InitFuse(Napi::Env env, Napi::Object exports);
}
