// vstore's C++ addon: only what JavaScript cannot do. Each area registers its functions here.
#include <napi.h>
#include "file.h"
#include "fs.h"
#include "fuse.h"
#include "uring.h"
#include "vhost.h"

static Napi::Object Init(Napi::Env env, Napi::Object exports) {
  vstore::InitFile(env, exports);
  vstore::InitVhost(env, exports);
  vstore::InitUring(env, exports);
  vstore::InitFs(env, exports);
  vstore::InitFuse(env, exports);
  return exports;
}

NODE_API_MODULE(vstore_native, Init)
