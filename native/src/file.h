// Sparse-file and block-device primitives that Node's fs module does not expose.
#pragma once
#include <napi.h>

namespace vstore {
void InitFile(Napi::Env env, Napi::Object exports);
}
