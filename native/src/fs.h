// The *at system calls of LocalFileTree (lib/fs/local.ts): a directory served confined to its root.
#pragma once
#include <napi.h>

namespace vstore {
void InitFs(Napi::Env env, Napi::Object exports);
}
