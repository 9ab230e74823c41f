// Uring: one io_uring instance driven from the libuv event loop.
//
// Hot path: read/write/fsync only fill a submission queue entry (no syscall, nothing returned).
// Everything queued during one event-loop turn is submitted with one io_uring_enter from a
// uv_prepare hook, i.e. just before the loop blocks. The ring signals an eventfd
// (io_uring_register_eventfd) watched by uv_poll; completions are reaped in batches and handed
// to one JavaScript callback as (id, result) pairs in a reused Int32Array, result being the
// byte count or a negative errno. Buffers are kept alive by the caller until their id completes
// (lib/block/file.ts keeps them in its slot table); the native object holds itself alive (Ref)
// while anything is in flight.
#include "uring.h"

#include "syserr.h"

#include <cerrno>
#include <cmath>
#include <cstdint>
#include <liburing.h>
#include <sys/eventfd.h>
#include <unistd.h>
#include <uv.h>

namespace vstore {
namespace {

bool ArgU(const Napi::CallbackInfo& info, size_t i, int64_t* out) {
  if (info.Length() <= i || !info[i].IsNumber()) return false;
  double d = info[i].As<Napi::Number>().DoubleValue();
  if (!std::isfinite(d) || d < 0 || d > 9007199254740991.0 || std::floor(d) != d) return false;
  *out = static_cast<int64_t>(d);
  return true;
}

constexpr uint32_t kBatch = 256;  // (id, result) pairs per callback at most

class Uring : public Napi::ObjectWrap<Uring> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "Uring",
                       {InstanceMethod("read", &Uring::Read), InstanceMethod("write", &Uring::Write),
                        InstanceMethod("fsync", &Uring::Fsync), InstanceMethod("submit", &Uring::Submit),
                        InstanceMethod("cancelAll", &Uring::CancelAll), InstanceMethod("close", &Uring::Close),
                        InstanceAccessor("inFlight", &Uring::InFlight, nullptr)});
  }

  // new Uring(entries, onComplete(pairs: Int32Array, count))
  Uring(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Uring>(info) {
    Napi::Env env = info.Env();
    int64_t entries;
    if (!ArgU(info, 0, &entries) || entries < 1 || entries > 32768 || info.Length() < 2 || !info[1].IsFunction()) {
      Napi::TypeError::New(env, "expected (entries 1..32768, onComplete(pairs, count))").ThrowAsJavaScriptException();
      return;
    }
    cb_ = Napi::Persistent(info[1].As<Napi::Function>());
    Napi::Int32Array pairs = Napi::Int32Array::New(env, kBatch * 2);
    pairs_data_ = pairs.Data();
    pairs_ = Napi::Persistent(pairs);
    ctx_ = std::make_unique<Napi::AsyncContext>(env, "vstore.Uring");

    struct io_uring_params p = {};
    p.flags = IORING_SETUP_CQSIZE;
    p.cq_entries = static_cast<uint32_t>(entries) * 4;
    int r = io_uring_queue_init_params(static_cast<unsigned>(entries), &ring_, &p);
    if (r < 0) {
      SysError(env, -r, "io_uring_setup").ThrowAsJavaScriptException();
      return;
    }
    ring_ok_ = true;
    efd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (efd_ < 0 || (r = io_uring_register_eventfd(&ring_, efd_)) < 0) {
      int err = efd_ < 0 ? errno : -r;
      Teardown();
      SysError(env, err, efd_ < 0 ? "eventfd" : "io_uring_register_eventfd").ThrowAsJavaScriptException();
      return;
    }
    uv_loop_t* loop = nullptr;
    if (napi_get_uv_event_loop(env, &loop) != napi_ok || loop == nullptr) {
      Teardown();
      Napi::Error::New(env, "no event loop").ThrowAsJavaScriptException();
      return;
    }
    poll_ = new uv_poll_t;
    uv_poll_init(loop, poll_, efd_);
    poll_->data = this;
    uv_poll_start(poll_, UV_READABLE, OnPoll);
    uv_unref(reinterpret_cast<uv_handle_t*>(poll_));  // referenced only while work is in flight
    prep_ = new uv_prepare_t;
    uv_prepare_init(loop, prep_);
    prep_->data = this;
    uv_unref(reinterpret_cast<uv_handle_t*>(prep_));
  }

  ~Uring() override { Teardown(); }

 private:
  // Queues one SQE; false (with a JS exception) when the ring is closed.
  io_uring_sqe* Sqe(Napi::Env env) {
    if (!ring_ok_ || closing_) {
      SysError(env, EBADF, "io_uring").ThrowAsJavaScriptException();
      return nullptr;
    }
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    if (sqe == nullptr) {  // submission queue full: submit now and take a fresh one
      DoSubmit();
      sqe = io_uring_get_sqe(&ring_);
      if (sqe == nullptr) {
        SysError(env, EAGAIN, "io_uring_get_sqe").ThrowAsJavaScriptException();
        return nullptr;
      }
    }
    return sqe;
  }

  void Queued(io_uring_sqe* sqe, double id) {
    io_uring_sqe_set_data64(sqe, static_cast<uint64_t>(id));
    inflight_++;
    if (!held_) {
      held_ = true;
      uv_ref(reinterpret_cast<uv_handle_t*>(poll_));
      Ref();
    }
    if (!prep_active_) {
      prep_active_ = true;
      uv_prepare_start(prep_, OnPrepare);
    }
  }

  // read(fd, buf, offset, id) / write(fd, buf, offset, id)
  Napi::Value Rw(const Napi::CallbackInfo& info, bool write) {
    Napi::Env env = info.Env();
    int64_t fd, off, id;
    if (!ArgU(info, 0, &fd) || info.Length() < 4 || !info[1].IsTypedArray() || !ArgU(info, 2, &off) || !ArgU(info, 3, &id)) {
      Napi::TypeError::New(env, "expected (fd, buffer, offset, id)").ThrowAsJavaScriptException();
      return env.Undefined();
    }
    Napi::TypedArray ta = info[1].As<Napi::TypedArray>();
    void* base = static_cast<uint8_t*>(ta.ArrayBuffer().Data()) + ta.ByteOffset();
    size_t len = ta.ByteLength();
    io_uring_sqe* sqe = Sqe(env);
    if (sqe == nullptr) return env.Undefined();
    if (write) io_uring_prep_write(sqe, static_cast<int>(fd), base, static_cast<unsigned>(len), static_cast<uint64_t>(off));
    else io_uring_prep_read(sqe, static_cast<int>(fd), base, static_cast<unsigned>(len), static_cast<uint64_t>(off));
    Queued(sqe, static_cast<double>(id));
    return env.Undefined();
  }
  Napi::Value Read(const Napi::CallbackInfo& info) { return Rw(info, false); }
  Napi::Value Write(const Napi::CallbackInfo& info) { return Rw(info, true); }

  // fsync(fd, datasync, id)
  Napi::Value Fsync(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    int64_t fd, id;
    if (!ArgU(info, 0, &fd) || info.Length() < 3 || !ArgU(info, 2, &id)) {
      Napi::TypeError::New(env, "expected (fd, datasync, id)").ThrowAsJavaScriptException();
      return env.Undefined();
    }
    io_uring_sqe* sqe = Sqe(env);
    if (sqe == nullptr) return env.Undefined();
    io_uring_prep_fsync(sqe, static_cast<int>(fd), info[1].ToBoolean().Value() ? IORING_FSYNC_DATASYNC : 0);
    Queued(sqe, static_cast<double>(id));
    return env.Undefined();
  }

  // submit(): submits what is queued now instead of at the end of this event-loop turn.
  Napi::Value Submit(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), DoSubmit());
  }

  // cancelAll(): asks the kernel to cancel everything in flight (IORING_ASYNC_CANCEL_ANY, Linux
  // 5.19); cancelled requests complete with -ECANCELED, the others complete normally.
  Napi::Value CancelAll(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!ring_ok_ || inflight_ == 0) return env.Undefined();
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    if (sqe == nullptr) {
      DoSubmit();
      sqe = io_uring_get_sqe(&ring_);
    }
    if (sqe != nullptr) {
      io_uring_prep_cancel64(sqe, 0, IORING_ASYNC_CANCEL_ANY);
      io_uring_sqe_set_data64(sqe, kInternal);
      DoSubmit();
    }
    return env.Undefined();
  }

  // close(): no new requests; waits (blocking) for what is still in flight, whose completions
  // are not delivered, then releases the ring, the eventfd and the loop handles. Callers that
  // must not block cancel and drain first (FileVolume does).
  Napi::Value Close(const Napi::CallbackInfo& info) {
    closing_ = true;
    if (ring_ok_) {
      DoSubmit();
      while (inflight_ > 0) {
        io_uring_cqe* cqe;
        int r = io_uring_wait_cqe(&ring_, &cqe);
        if (r == -EINTR) continue;
        if (r < 0) break;
        if (io_uring_cqe_get_data64(cqe) != kInternal) inflight_--;
        io_uring_cqe_seen(&ring_, cqe);
      }
    }
    Teardown();
    return info.Env().Undefined();
  }

  Napi::Value InFlight(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), inflight_); }

  int DoSubmit() {
    if (!ring_ok_) return 0;
    int r;
    do {
      r = io_uring_submit(&ring_);
    } while (r == -EINTR);
    if (prep_active_) {
      prep_active_ = false;
      uv_prepare_stop(prep_);
    }
    return r;
  }

  static void OnPrepare(uv_prepare_t* h) {
    auto* self = static_cast<Uring*>(h->data);
    if (self != nullptr) self->DoSubmit();
  }

  static void OnPoll(uv_poll_t* h, int, int) {
    auto* self = static_cast<Uring*>(h->data);
    if (self != nullptr) self->Reap();
  }

  void Reap() {
    uint64_t v;
    while (read(efd_, &v, sizeof v) < 0 && errno == EINTR) {
    }
    Napi::Env env = Env();
    Napi::HandleScope scope(env);
    for (;;) {
      if (!ring_ok_) return;
      io_uring_cqe* cqes[kBatch];
      unsigned n = io_uring_peek_batch_cqe(&ring_, cqes, kBatch);
      if (n == 0) {
        // CQEs the kernel kept aside when the CQ ring was full (IORING_FEAT_NODROP) come back on enter.
        if (io_uring_cq_has_overflow(&ring_)) {
          io_uring_get_events(&ring_);
          n = io_uring_peek_batch_cqe(&ring_, cqes, kBatch);
        }
        if (n == 0) break;
      }
      uint32_t count = 0;
      for (unsigned i = 0; i < n; i++) {
        uint64_t id = io_uring_cqe_get_data64(cqes[i]);
        if (id == kInternal) continue;
        pairs_data_[2 * count] = static_cast<int32_t>(id);
        pairs_data_[2 * count + 1] = cqes[i]->res;
        count++;
      }
      io_uring_cq_advance(&ring_, n);
      inflight_ -= count;
      if (count > 0) {
        cb_.MakeCallback(Value(), {pairs_.Value(), Napi::Number::New(env, count)}, *ctx_);
        if (env.IsExceptionPending()) {
          Napi::Error e = env.GetAndClearPendingException();
          napi_fatal_exception(env, e.Value());
        }
      }
      if (inflight_ == 0 && held_) Release();
    }
  }

  void Release() {
    held_ = false;
    if (poll_ != nullptr) uv_unref(reinterpret_cast<uv_handle_t*>(poll_));
    Unref();
  }

  void Teardown() {
    if (inflight_ > 0 && ring_ok_) {
      // only after close() gave up waiting (a ring error): keep the ring rather than let the
      // kernel write into freed buffers.
      return;
    }
    if (held_) Release();
    if (poll_ != nullptr) {
      uv_poll_stop(poll_);
      poll_->data = nullptr;
      uv_close(reinterpret_cast<uv_handle_t*>(poll_), [](uv_handle_t* h) { delete reinterpret_cast<uv_poll_t*>(h); });
      poll_ = nullptr;
    }
    if (prep_ != nullptr) {
      uv_prepare_stop(prep_);
      prep_->data = nullptr;
      uv_close(reinterpret_cast<uv_handle_t*>(prep_), [](uv_handle_t* h) { delete reinterpret_cast<uv_prepare_t*>(h); });
      prep_ = nullptr;
    }
    if (ring_ok_) {
      io_uring_queue_exit(&ring_);
      ring_ok_ = false;
    }
    if (efd_ >= 0) {
      close(efd_);
      efd_ = -1;
    }
  }

  static constexpr uint64_t kInternal = UINT64_MAX;
  struct io_uring ring_ = {};
  bool ring_ok_ = false;
  bool closing_ = false;
  bool prep_active_ = false;
  bool held_ = false;
  int efd_ = -1;
  uint32_t inflight_ = 0;
  uv_poll_t* poll_ = nullptr;
  uv_prepare_t* prep_ = nullptr;
  Napi::FunctionReference cb_;
  Napi::Reference<Napi::Int32Array> pairs_;
  int32_t* pairs_data_ = nullptr;
  std::unique_ptr<Napi::AsyncContext> ctx_;
};

// uringError(errno, syscall): the Error a completion's negative result stands for (syserr.h).
Napi::Value UringError(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int64_t err;
  if (!ArgU(info, 0, &err) || err == 0 || err > 4095 || info.Length() < 2 || !info[1].IsString()) {
    Napi::TypeError::New(env, "expected (errno > 0, syscall)").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  std::string syscall = info[1].As<Napi::String>().Utf8Value();
  return SysError(env, static_cast<int>(err), syscall.c_str()).Value();
}

}  // namespace

void InitUring(Napi::Env env, Napi::Object exports) {
  exports.Set("Uring", Uring::Define(env));
  exports.Set("uringError", Napi::Function::New(env, UringError, "uringError"));
}

}  // namespace vstore
