// io_uring engine (liburing): positioned reads, writes and fdatasync completed in the event loop.
#pragma once
#include <napi.h>

namespace vstore {
void InitUring(Napi::Env env, Napi::Object exports);
}
