{
  "targets": [
    {
      "target_name": "vstore_native",
      "sources": ["src/addon.cc", "src/file.cc", "src/vhost.cc", "src/uring.cc", "src/fs.cc", "src/fuse.cc"],
      "libraries": ["-luring"],
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")"],
      "defines": ["NAPI_VERSION=8", "NAPI_DISABLE_CPP_EXCEPTIONS"],
      "cflags_cc": ["-std=c++17", "-O2", "-Wall", "-Wextra", "-fno-exceptions"],
      "cflags_cc!": ["-fno-rtti"]
    }
  ]
}
