// edgert's OpenCL runtime for TVM 0.27 (apache-tvm 0.27.0.post1, tvm-ffi 0.1.14).
//
// Why this file exists: the apache-tvm wheel generates OpenCL C but is built with
// USE_OPENCL=OFF, so it can neither load an exported module holding OpenCL kernels
// ("ffi.Module.load_from_bytes.opencl" is not registered) nor allocate on kDLOpenCL
// ("device_api.opencl"). This library registers exactly those two things, plus kernel launch,
// against the headers the wheels ship (tvm/runtime/device_api.h, tvm/ffi/*).
//
// Why dlopen instead of -lOpenCL: phones and boards keep the vendor's libOpenCL outside the
// linker's path (/vendor/lib64 on Android, libmali on RK3588), and a library that fails to load
// because libOpenCL is missing cannot say so; here "no OpenCL" is an answer, not a load error.
//
// Profiling (`edgert profile` on a GPU artifact): "edgert.opencl.profiling"(true) switches every
// device to a queue created with CL_QUEUE_PROFILING_ENABLE and records each kernel launch's event;
// "edgert.opencl.profile_records" returns per kernel and work sizes the count and device time
// (CL_PROFILING_COMMAND_START..END). Off by default: a profiling queue costs a timestamp per command.
// The device API counts the bytes it allocated (now, peak, allocations): "edgert.opencl.memory".
//
// Deliberately left out (TVM's own runtime has them): textures/image2d memory scopes,
// precompiled program binaries, sub-buffers, several devices per context.
#define CL_TARGET_OPENCL_VERSION 120
#define CL_USE_DEPRECATED_OPENCL_1_2_APIS
#include <CL/cl.h>
#include <dlfcn.h>
#include <tvm/ffi/cast.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/dtype.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/reflection/registry.h>
#include <tvm/runtime/device_api.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

namespace edgert_opencl {

namespace ffi = tvm::ffi;
using tvm::runtime::DeviceAttrKind;

// ---------------------------------------------------------------- OpenCL entry points (dlopen)
#define EDGERT_CL_FUNCTIONS(X)                                                                \
  X(clGetPlatformIDs) X(clGetPlatformInfo) X(clGetDeviceIDs) X(clGetDeviceInfo)                \
  X(clCreateContext) X(clCreateCommandQueue) X(clCreateBuffer) X(clReleaseMemObject)           \
  X(clEnqueueWriteBuffer) X(clEnqueueReadBuffer) X(clEnqueueCopyBuffer) X(clFinish)            \
  X(clCreateProgramWithSource) X(clBuildProgram) X(clGetProgramBuildInfo) X(clReleaseProgram)  \
  X(clCreateKernel) X(clReleaseKernel) X(clSetKernelArg) X(clGetKernelWorkGroupInfo)           \
  X(clEnqueueNDRangeKernel) X(clWaitForEvents) X(clGetEventProfilingInfo) X(clReleaseEvent)  \
  X(clReleaseCommandQueue)

struct CLApi {
#define EDGERT_DECLARE(name) decltype(&::name) name = nullptr;
  EDGERT_CL_FUNCTIONS(EDGERT_DECLARE)
#undef EDGERT_DECLARE
};

const char* ErrorName(cl_int err) {
  switch (err) {
#define EDGERT_CASE(e) \
  case e:              \
    return #e;
    EDGERT_CASE(CL_DEVICE_NOT_FOUND) EDGERT_CASE(CL_MEM_OBJECT_ALLOCATION_FAILURE)
    EDGERT_CASE(CL_OUT_OF_RESOURCES) EDGERT_CASE(CL_OUT_OF_HOST_MEMORY)
    EDGERT_CASE(CL_BUILD_PROGRAM_FAILURE) EDGERT_CASE(CL_INVALID_VALUE)
    EDGERT_CASE(CL_INVALID_BUFFER_SIZE) EDGERT_CASE(CL_INVALID_MEM_OBJECT)
    EDGERT_CASE(CL_INVALID_KERNEL_NAME) EDGERT_CASE(CL_INVALID_KERNEL_ARGS)
    EDGERT_CASE(CL_INVALID_ARG_INDEX) EDGERT_CASE(CL_INVALID_ARG_VALUE)
    EDGERT_CASE(CL_INVALID_ARG_SIZE) EDGERT_CASE(CL_INVALID_WORK_GROUP_SIZE)
    EDGERT_CASE(CL_INVALID_WORK_ITEM_SIZE) EDGERT_CASE(CL_INVALID_GLOBAL_WORK_SIZE)
    EDGERT_CASE(CL_INVALID_PROGRAM_EXECUTABLE) EDGERT_CASE(CL_INVALID_COMMAND_QUEUE)
    EDGERT_CASE(CL_INVALID_CONTEXT) EDGERT_CASE(CL_INVALID_DEVICE)
#undef EDGERT_CASE
    default:
      return "CL error";
  }
}

#define EDGERT_CL_CHECK(call)                                                              \
  do {                                                                                     \
    cl_int err_ = (call);                                                                  \
    if (err_ != CL_SUCCESS) {                                                              \
      TVM_FFI_THROW(RuntimeError) << "OpenCL call " << #call << " failed: " << ErrorName(err_) \
                                  << " (" << err_ << ")";                                 \
    }                                                                                      \
  } while (0)

// One OpenCL device with its own context and in-order queue (kernels and copies are ordered,
// so a blocking read after a launch sees its results; StreamSync is clFinish).
struct Device {
  cl_device_id id;
  cl_context context;
  cl_command_queue queue;
  cl_command_queue plain_queue = nullptr;      // the queue without profiling
  cl_command_queue profiling_queue = nullptr;  // made on the first "edgert.opencl.profiling"(true)
  std::string name;
  std::string version;   // "OpenCL 3.0 PoCL ..." as the driver reports it
  std::string platform;  // CL_PLATFORM_NAME: "Portable Computing Language" for PoCL
  std::string type;      // CL_DEVICE_TYPE: "GPU", "CPU", "ACCELERATOR" or "OTHER"
  size_t max_work_group_size = 0;
  size_t max_work_item_sizes[3] = {0, 0, 0};
  cl_ulong max_alloc = 0;
};

// The process's OpenCL state, set up on first use: the loaded libOpenCL and its devices (GPUs
// first; if a machine has none, any device, e.g. PoCL's CPU device). Never freed: kernels and
// buffers may be released by TVM objects during interpreter shutdown.
class Workspace {
 public:
  static Workspace* Global() {
    static Workspace* w = new Workspace();
    return w;
  }
  CLApi cl;
  std::vector<Device> devices;
  std::string why_none;  // set when devices is empty

  Device& Get(int device_id) {
    if (devices.empty()) TVM_FFI_THROW(RuntimeError) << "no OpenCL device found: " << why_none;
    if (device_id < 0 || device_id >= static_cast<int>(devices.size())) {
      TVM_FFI_THROW(ValueError) << "OpenCL device " << device_id << " does not exist ("
                                << devices.size() << " found)";
    }
    return devices[device_id];
  }

 private:
  Workspace() {
    if (!Load()) return;
    cl_uint nplat = 0;
    if (cl.clGetPlatformIDs(0, nullptr, &nplat) != CL_SUCCESS || nplat == 0) {
      why_none = "the OpenCL loader found no platform (no driver / ICD installed)";
      return;
    }
    std::vector<cl_platform_id> platforms(nplat);
    cl.clGetPlatformIDs(nplat, platforms.data(), nullptr);
    for (cl_device_type type : {cl_device_type{CL_DEVICE_TYPE_GPU}, cl_device_type{CL_DEVICE_TYPE_ALL}}) {
      for (cl_platform_id p : platforms) AddDevices(p, type);
      if (!devices.empty()) return;
    }
    why_none = "the OpenCL platforms report no device";
  }

  bool Load() {
    // EDGERT_OPENCL_LIBRARY names the driver library explicitly; otherwise the ICD loader and
    // the places Android vendors put theirs.
    std::vector<std::string> names;
    if (const char* env = std::getenv("EDGERT_OPENCL_LIBRARY")) names.push_back(env);
    for (const char* n : {"libOpenCL.so.1", "libOpenCL.so", "/vendor/lib64/libOpenCL.so",
                          "/system/vendor/lib64/libOpenCL.so", "/system/lib64/libOpenCL.so",
                          "/vendor/lib64/egl/libGLES_mali.so"}) {
      names.push_back(n);
    }
    void* handle = nullptr;
    for (const auto& n : names) {
      if ((handle = dlopen(n.c_str(), RTLD_NOW | RTLD_LOCAL)) != nullptr) break;
    }
    if (handle == nullptr) {
      why_none = "no OpenCL library (libOpenCL.so.1) could be loaded";
      return false;
    }
#define EDGERT_RESOLVE(name)                                           \
  cl.name = reinterpret_cast<decltype(cl.name)>(dlsym(handle, #name)); \
  if (cl.name == nullptr) {                                            \
    why_none = "the OpenCL library lacks " #name;                      \
    return false;                                                      \
  }
    EDGERT_CL_FUNCTIONS(EDGERT_RESOLVE)
#undef EDGERT_RESOLVE
    return true;
  }

  std::string Info(cl_device_id d, cl_device_info what) {
    size_t n = 0;
    cl.clGetDeviceInfo(d, what, 0, nullptr, &n);
    std::string s(n, '\0');
    cl.clGetDeviceInfo(d, what, n, s.data(), nullptr);
    while (!s.empty() && s.back() == '\0') s.pop_back();
    return s;
  }

  std::string PlatformName(cl_platform_id p) {
    size_t n = 0;
    cl.clGetPlatformInfo(p, CL_PLATFORM_NAME, 0, nullptr, &n);
    std::string s(n, '\0');
    cl.clGetPlatformInfo(p, CL_PLATFORM_NAME, n, s.data(), nullptr);
    while (!s.empty() && s.back() == '\0') s.pop_back();
    return s;
  }

  void AddDevices(cl_platform_id platform, cl_device_type type) {
    cl_uint n = 0;
    if (cl.clGetDeviceIDs(platform, type, 0, nullptr, &n) != CL_SUCCESS || n == 0) return;
    std::vector<cl_device_id> ids(n);
    cl.clGetDeviceIDs(platform, type, n, ids.data(), nullptr);
    for (cl_device_id id : ids) {
      cl_int err;
      Device d;
      d.id = id;
      d.context = cl.clCreateContext(nullptr, 1, &id, nullptr, nullptr, &err);
      if (err != CL_SUCCESS) continue;
      d.queue = cl.clCreateCommandQueue(d.context, id, 0, &err);
      if (err != CL_SUCCESS) continue;
      d.plain_queue = d.queue;
      d.name = Info(id, CL_DEVICE_NAME);
      d.version = Info(id, CL_DEVICE_VERSION);
      d.platform = PlatformName(platform);
      cl_device_type dtype = 0;
      cl.clGetDeviceInfo(id, CL_DEVICE_TYPE, sizeof(dtype), &dtype, nullptr);
      d.type = dtype & CL_DEVICE_TYPE_GPU           ? "GPU"
               : dtype & CL_DEVICE_TYPE_CPU         ? "CPU"
               : dtype & CL_DEVICE_TYPE_ACCELERATOR ? "ACCELERATOR"
                                                    : "OTHER";
      cl.clGetDeviceInfo(id, CL_DEVICE_MAX_WORK_GROUP_SIZE, sizeof(size_t),
                         &d.max_work_group_size, nullptr);
      cl.clGetDeviceInfo(id, CL_DEVICE_MAX_WORK_ITEM_SIZES, sizeof(d.max_work_item_sizes),
                         d.max_work_item_sizes, nullptr);
      cl.clGetDeviceInfo(id, CL_DEVICE_MAX_MEM_ALLOC_SIZE, sizeof(cl_ulong), &d.max_alloc,
                         nullptr);
      devices.push_back(d);
    }
  }
};

// The device the current thread works on; TVM's host code sets it through __tvm_set_device.
thread_local int current_device = 0;

// ---------------------------------------------------------------- profiling and memory accounting
// Kernel launches while profiling is on: each keeps its event until its times are read (after a
// clFinish, or when many are pending), then adds to the record of its kernel and work sizes.
class Profiler {
 public:
  struct Record {
    uint64_t count = 0;
    uint64_t total_ns = 0;
    uint64_t min_ns = UINT64_MAX;
    uint64_t max_ns = 0;
  };
  using Key = std::tuple<std::string, std::array<size_t, 3>, std::array<size_t, 3>, int>;

  static Profiler* Global() {
    static Profiler* p = new Profiler();
    return p;
  }
  std::atomic<bool> enabled{false};

  void Add(const std::string& name, const size_t* global, const size_t* local, int dim,
           cl_event event) {
    std::lock_guard<std::mutex> lock(mu_);
    pending_.push_back({Key{name, {global[0], global[1], global[2]}, {local[0], local[1], local[2]},
                            dim},
                        event});
    if (pending_.size() >= 4096) DrainLocked(true);  // bounded: a long profile waits now and then
  }

  // Read the times of the finished launches (all of them if ``wait``).
  void Drain(bool wait) {
    std::lock_guard<std::mutex> lock(mu_);
    DrainLocked(wait);
  }

  ffi::Array<ffi::Array<ffi::Any>> Records() {
    std::lock_guard<std::mutex> lock(mu_);
    ffi::Array<ffi::Array<ffi::Any>> out;
    for (const auto& kv : records_) {
      const auto& [name, global, local, dim] = kv.first;
      ffi::Array<ffi::Any> row;
      row.push_back(ffi::String(name));
      row.push_back(static_cast<int64_t>(kv.second.count));
      row.push_back(static_cast<int64_t>(kv.second.total_ns));
      row.push_back(static_cast<int64_t>(kv.second.min_ns));
      row.push_back(static_cast<int64_t>(kv.second.max_ns));
      for (int i = 0; i < 3; ++i) row.push_back(static_cast<int64_t>(global[i]));
      for (int i = 0; i < 3; ++i) row.push_back(static_cast<int64_t>(local[i]));
      row.push_back(static_cast<int64_t>(dim));
      out.push_back(row);
    }
    return out;
  }

  void Clear() {
    std::lock_guard<std::mutex> lock(mu_);
    DrainLocked(true);
    records_.clear();
  }

 private:
  void DrainLocked(bool wait);
  std::mutex mu_;
  std::vector<std::pair<Key, cl_event>> pending_;
  std::map<Key, Record> records_;
};

// Bytes the device API holds on each device's behalf (TVM's pools included: what the device gave).
struct MemoryStats {
  std::mutex mu;
  std::map<void*, size_t> sizes;
  int64_t current = 0, peak = 0, allocations = 0;

  static MemoryStats* Global() {
    static MemoryStats* m = new MemoryStats();
    return m;
  }
  void Alloc(void* ptr, size_t nbytes) {
    std::lock_guard<std::mutex> lock(mu);
    sizes[ptr] = nbytes;
    current += static_cast<int64_t>(nbytes);
    peak = std::max(peak, current);
    ++allocations;
  }
  void Free(void* ptr) {
    std::lock_guard<std::mutex> lock(mu);
    auto it = sizes.find(ptr);
    if (it == sizes.end()) return;
    current -= static_cast<int64_t>(it->second);
    sizes.erase(it);
  }
};

void Profiler::DrainLocked(bool wait) {
  CLApi& cl = Workspace::Global()->cl;
  std::vector<std::pair<Key, cl_event>> still;
  for (auto& [key, event] : pending_) {
    if (wait) cl.clWaitForEvents(1, &event);
    cl_ulong start = 0, end = 0;
    cl_int a = cl.clGetEventProfilingInfo(event, CL_PROFILING_COMMAND_START, sizeof(start), &start,
                                          nullptr);
    cl_int b = cl.clGetEventProfilingInfo(event, CL_PROFILING_COMMAND_END, sizeof(end), &end, nullptr);
    if ((a == CL_PROFILING_INFO_NOT_AVAILABLE || b == CL_PROFILING_INFO_NOT_AVAILABLE) && !wait) {
      still.emplace_back(key, event);  // not finished yet
      continue;
    }
    if (a == CL_SUCCESS && b == CL_SUCCESS && end >= start) {
      Record& r = records_[key];
      uint64_t ns = end - start;
      r.count += 1;
      r.total_ns += ns;
      r.min_ns = std::min(r.min_ns, ns);
      r.max_ns = std::max(r.max_ns, ns);
    }
    cl.clReleaseEvent(event);
  }
  pending_.swap(still);
}

// Switch every device to a profiling queue (made once) or back; the old queue is drained first so
// that commands stay in order.
void SetProfiling(bool on) {
  Workspace* w = Workspace::Global();
  Profiler* p = Profiler::Global();
  for (Device& d : w->devices) {
    EDGERT_CL_CHECK(w->cl.clFinish(d.queue));
    if (on && d.profiling_queue == nullptr) {
      cl_int err;
      d.profiling_queue =
          w->cl.clCreateCommandQueue(d.context, d.id, CL_QUEUE_PROFILING_ENABLE, &err);
      if (err != CL_SUCCESS) {
        d.profiling_queue = nullptr;
        TVM_FFI_THROW(RuntimeError) << "OpenCL device " << d.name
                                    << " cannot make a profiling queue: " << ErrorName(err);
      }
    }
    d.queue = on ? d.profiling_queue : d.plain_queue;
  }
  p->Drain(true);
  p->enabled = on;
}

// ---------------------------------------------------------------- device API (kDLOpenCL)
// A tensor's data pointer is the cl_mem itself: host code only passes it on to kernels, and
// byte offsets are applied by the copies (clEnqueue*Buffer offsets).
class DeviceAPI final : public tvm::runtime::DeviceAPI {
 public:
  using tvm::runtime::DeviceAPI::AllocDataSpace;
  using tvm::runtime::DeviceAPI::CopyDataFromTo;

  void SetDevice(DLDevice dev) final { current_device = dev.device_id; }

  void GetAttr(DLDevice dev, DeviceAttrKind kind, ffi::Any* rv) final {
    Workspace* w = Workspace::Global();
    if (kind == tvm::runtime::kExist) {
      *rv = static_cast<int>(dev.device_id >= 0 &&
                             dev.device_id < static_cast<int>(w->devices.size()));
      return;
    }
    Device& d = w->Get(dev.device_id);
    auto info_uint = [&](cl_device_info what) {
      cl_ulong v = 0;  // read into the low bytes (little-endian): fits cl_uint and cl_ulong
      w->cl.clGetDeviceInfo(d.id, what, sizeof(v), &v, nullptr);
      return static_cast<int64_t>(v);
    };
    switch (kind) {
      case tvm::runtime::kMaxThreadsPerBlock:
        *rv = static_cast<int64_t>(d.max_work_group_size);
        break;
      case tvm::runtime::kWarpSize:
        *rv = 1;  // as TVM's OpenCL runtime: OpenCL has no portable sub-group size
        break;
      case tvm::runtime::kMaxSharedMemoryPerBlock:
        *rv = info_uint(CL_DEVICE_LOCAL_MEM_SIZE);
        break;
      case tvm::runtime::kComputeVersion:  // "OpenCL 3.0 ..." -> "3.0"
        *rv = d.version.substr(7, d.version.find(' ', 7) - 7);
        break;
      case tvm::runtime::kDeviceName:
        *rv = d.name;
        break;
      case tvm::runtime::kMaxClockRate:  // MHz in OpenCL, kHz in TVM's attribute
        *rv = static_cast<int64_t>(static_cast<cl_uint>(info_uint(CL_DEVICE_MAX_CLOCK_FREQUENCY))) * 1000;
        break;
      case tvm::runtime::kMultiProcessorCount:
        *rv = static_cast<int64_t>(static_cast<cl_uint>(info_uint(CL_DEVICE_MAX_COMPUTE_UNITS)));
        break;
      case tvm::runtime::kMaxThreadDimensions: {
        std::ostringstream os;
        os << "[" << d.max_work_item_sizes[0] << ", " << d.max_work_item_sizes[1] << ", "
           << d.max_work_item_sizes[2] << "]";
        *rv = os.str();
        break;
      }
      case tvm::runtime::kApiVersion:
        *rv = d.version;
        break;
      case tvm::runtime::kTotalGlobalMemory:
        *rv = info_uint(CL_DEVICE_GLOBAL_MEM_SIZE);
        break;
      default:
        break;  // unknown to OpenCL: TVM treats an unset value as "not available"
    }
  }

  void* AllocDataSpace(DLDevice dev, size_t nbytes, size_t alignment, DLDataType) final {
    Workspace* w = Workspace::Global();
    Device& d = w->Get(dev.device_id);
    if (nbytes > d.max_alloc) {
      TVM_FFI_THROW(RuntimeError) << "OpenCL out of memory: cannot allocate " << nbytes
                                  << " bytes on " << d.name << " (largest buffer the device allows: "
                                  << d.max_alloc << " bytes)";
    }
    cl_int err;
    // A zero-byte buffer is invalid in OpenCL; empty tensors still need a distinct handle.
    cl_mem mem = w->cl.clCreateBuffer(d.context, CL_MEM_READ_WRITE, nbytes ? nbytes : 1, nullptr,
                                      &err);
    if (err != CL_SUCCESS) {
      TVM_FFI_THROW(RuntimeError) << "OpenCL out of memory: cannot allocate " << nbytes
                                  << " bytes on " << d.name << ": " << ErrorName(err);
    }
    MemoryStats::Global()->Alloc(mem, nbytes);
    return mem;
  }

  void FreeDataSpace(DLDevice, void* ptr) final {
    if (ptr == nullptr) return;
    MemoryStats::Global()->Free(ptr);
    Workspace::Global()->cl.clReleaseMemObject(static_cast<cl_mem>(ptr));
  }

  void StreamSync(DLDevice dev, TVMStreamHandle) final {
    Workspace* w = Workspace::Global();
    EDGERT_CL_CHECK(w->cl.clFinish(w->Get(dev.device_id).queue));
    if (Profiler::Global()->enabled) Profiler::Global()->Drain(false);
  }

 protected:
  void CopyDataFromTo(const void* from, size_t from_offset, void* to, size_t to_offset,
                      size_t size, DLDevice dev_from, DLDevice dev_to, DLDataType,
                      TVMStreamHandle) final {
    if (size == 0) return;
    Workspace* w = Workspace::Global();
    bool from_cl = dev_from.device_type == kDLOpenCL, to_cl = dev_to.device_type == kDLOpenCL;
    if (from_cl && to_cl) {
      if (dev_from.device_id == dev_to.device_id) {
        EDGERT_CL_CHECK(w->cl.clEnqueueCopyBuffer(w->Get(dev_to.device_id).queue, (cl_mem)from,
                                                  (cl_mem)to, from_offset, to_offset, size, 0,
                                                  nullptr, nullptr));
      } else {  // two devices, two contexts: through the host
        std::vector<char> tmp(size);
        EDGERT_CL_CHECK(w->cl.clEnqueueReadBuffer(w->Get(dev_from.device_id).queue, (cl_mem)from,
                                                  CL_TRUE, from_offset, size, tmp.data(), 0,
                                                  nullptr, nullptr));
        EDGERT_CL_CHECK(w->cl.clEnqueueWriteBuffer(w->Get(dev_to.device_id).queue, (cl_mem)to,
                                                   CL_TRUE, to_offset, size, tmp.data(), 0,
                                                   nullptr, nullptr));
      }
    } else if (from_cl && dev_to.device_type == kDLCPU) {
      EDGERT_CL_CHECK(w->cl.clEnqueueReadBuffer(w->Get(dev_from.device_id).queue, (cl_mem)from,
                                                CL_TRUE, from_offset, size,
                                                static_cast<char*>(to) + to_offset, 0, nullptr,
                                                nullptr));
    } else if (to_cl && dev_from.device_type == kDLCPU) {
      // Blocking: the host buffer may be freed as soon as this returns.
      EDGERT_CL_CHECK(w->cl.clEnqueueWriteBuffer(w->Get(dev_to.device_id).queue, (cl_mem)to,
                                                 CL_TRUE, to_offset, size,
                                                 static_cast<const char*>(from) + from_offset, 0,
                                                 nullptr, nullptr));
    } else {
      TVM_FFI_THROW(ValueError) << "OpenCL runtime cannot copy from device type "
                                << dev_from.device_type << " to " << dev_to.device_type;
    }
  }
};

// ---------------------------------------------------------------- the module of kernels
// Reader of TVM's binary stream format (little-endian; uint64 lengths before strings/arrays).
class Reader {
 public:
  Reader(const char* data, size_t size) : p_(data), end_(data + size) {}
  template <typename T>
  T Pod() {
    T v;
    Need(sizeof(T));
    std::memcpy(&v, p_, sizeof(T));
    p_ += sizeof(T);
    return v;
  }
  std::string Str() {
    uint64_t n = Pod<uint64_t>();
    Need(n);
    std::string s(p_, n);
    p_ += n;
    return s;
  }

 private:
  void Need(uint64_t n) {
    if (n > static_cast<uint64_t>(end_ - p_)) {
      TVM_FFI_THROW(ValueError) << "truncated or corrupt OpenCL module in the library";
    }
  }
  const char* p_;
  const char* end_;
};

struct Kernel {
  std::string name;
  std::vector<DLDataType> arg_types;
  std::vector<int> launch_axes;  // per launch argument: 0-2 blockIdx.x-z, 3-5 threadIdx.x-z
  std::string source;            // this kernel's OpenCL C (TVM splits the module per kernel)
  std::mutex mu;                 // clSetKernelArg + enqueue on one cl_kernel must not interleave
  std::map<int, std::pair<cl_program, cl_kernel>> built;  // per device id
};

class Module : public ffi::ModuleObj {
 public:
  // Format written by TVM 0.27's OpenCLModuleNode::SaveToBytes (and its codegen fallback):
  //   String fmt ("cl"), Map<String, FunctionInfo> fmap, Bytes code
  // FunctionInfo = String name, Array<DLDataType> arg_types (u8 code, u8 bits, u16 lanes),
  //   Array<String> launch_param_tags, Array<int32> arg_extra_tags.
  explicit Module(const ffi::Bytes& bytes) : bytes_(bytes) {
    Reader r(bytes.data(), bytes.size());
    std::string fmt = r.Str();
    if (fmt != "cl") {
      TVM_FFI_THROW(ValueError) << "edgert's OpenCL runtime runs OpenCL C source modules only, not '"
                                << fmt << "'";
    }
    uint64_t n = r.Pod<uint64_t>();
    for (uint64_t i = 0; i < n; ++i) {
      auto k = std::make_unique<Kernel>();
      std::string key = r.Str();
      k->name = r.Str();
      for (uint64_t j = 0, m = r.Pod<uint64_t>(); j < m; ++j) {
        DLDataType t;
        t.code = r.Pod<uint8_t>();
        t.bits = r.Pod<uint8_t>();
        t.lanes = r.Pod<uint16_t>();
        k->arg_types.push_back(t);
      }
      for (uint64_t j = 0, m = r.Pod<uint64_t>(); j < m; ++j) {
        std::string tag = r.Str();
        if (tag.rfind("blockIdx.", 0) == 0 && tag.size() == 10) {
          k->launch_axes.push_back(tag[9] - 'x');
        } else if (tag.rfind("threadIdx.", 0) == 0 && tag.size() == 11) {
          k->launch_axes.push_back(3 + tag[10] - 'x');
        } else {  // dynamic shared memory, cooperative launch: CUDA-only launch features
          TVM_FFI_THROW(ValueError) << "OpenCL kernel '" << key << "': unsupported launch tag '"
                                    << tag << "'";
        }
      }
      for (uint64_t j = 0, m = r.Pod<uint64_t>(); j < m; ++j) r.Pod<int32_t>();
      kernels_[key] = std::move(k);
    }
    source_ = r.Str();
    SplitSource();
  }

  const char* kind() const final { return "opencl"; }
  int GetPropertyMask() const final {
    return ffi::Module::kBinarySerializable | ffi::Module::kRunnable;
  }
  ffi::Bytes SaveToBytes() const final { return bytes_; }  // unchanged: reloads anywhere
  ffi::String InspectSource(const ffi::String&) const final { return source_; }

  ffi::Optional<ffi::Function> GetFunction(const ffi::String& name) final {
    auto it = kernels_.find(std::string(name));
    if (it == kernels_.end()) return std::nullopt;
    Kernel* k = it->second.get();
    // The closure holds the module alive as long as TVM's host code keeps the function.
    ffi::ObjectPtr<ffi::Object> self = ffi::GetObjectPtr<ffi::Object>(this);
    return ffi::Function::FromPacked([self, this, k](ffi::PackedArgs args, ffi::Any*) {
      Launch(k, args);
    });
  }

 private:
  // TVM's codegen writes "// Function: NAME" before each kernel; each part is built as its own
  // program (as TVM does), so one kernel the driver rejects names itself. Text before the first
  // marker (extension pragmas) is kept for every kernel.
  void SplitSource() {
    const std::string mark = "// Function: ";
    size_t pos = source_.find(mark);
    std::string preamble = source_.substr(0, pos == std::string::npos ? 0 : pos);
    while (pos != std::string::npos) {
      size_t eol = source_.find('\n', pos);
      if (eol == std::string::npos) break;
      std::string name = source_.substr(pos + mark.size(), eol - pos - mark.size());
      size_t next = source_.find(mark, eol);
      auto it = kernels_.find(name);
      if (it != kernels_.end()) {
        it->second->source = preamble + source_.substr(eol + 1, next == std::string::npos
                                                                    ? std::string::npos
                                                                    : next - eol - 1);
      }
      pos = next;
    }
    for (auto& kv : kernels_) {
      if (kv.second->source.empty()) {
        TVM_FFI_THROW(ValueError) << "OpenCL module has no source for kernel '" << kv.first << "'";
      }
    }
  }

  cl_kernel Build(Kernel* k, Workspace* w, int device_id) {
    auto it = k->built.find(device_id);
    if (it != k->built.end()) return it->second.second;
    Device& d = w->Get(device_id);
    const char* src = k->source.c_str();
    size_t len = k->source.size();
    cl_int err;
    cl_program program = w->cl.clCreateProgramWithSource(d.context, 1, &src, &len, &err);
    EDGERT_CL_CHECK(err);
    err = w->cl.clBuildProgram(program, 1, &d.id, nullptr, nullptr, nullptr);
    if (err != CL_SUCCESS) {
      size_t n = 0;
      w->cl.clGetProgramBuildInfo(program, d.id, CL_PROGRAM_BUILD_LOG, 0, nullptr, &n);
      std::string log(n, '\0');
      w->cl.clGetProgramBuildInfo(program, d.id, CL_PROGRAM_BUILD_LOG, n, log.data(), nullptr);
      w->cl.clReleaseProgram(program);
      TVM_FFI_THROW(RuntimeError) << "OpenCL kernel '" << k->name << "' failed to build on "
                                  << d.name << " (" << ErrorName(err) << "); compiler log:\n"
                                  << log;
    }
    cl_kernel kernel = w->cl.clCreateKernel(program, k->name.c_str(), &err);
    if (err != CL_SUCCESS) {
      w->cl.clReleaseProgram(program);
      TVM_FFI_THROW(RuntimeError) << "OpenCL kernel '" << k->name << "': clCreateKernel failed: "
                                  << ErrorName(err);
    }
    k->built[device_id] = {program, kernel};
    return kernel;
  }

  // Arguments as TVM's host code passes them: the kernel's parameters (buffers as data
  // pointers, i.e. cl_mem; scalars), then one int64 extent per launch tag.
  void Launch(Kernel* k, ffi::PackedArgs args) {
    size_t nargs = k->arg_types.size();
    if (static_cast<size_t>(args.size()) != nargs + k->launch_axes.size()) {
      TVM_FFI_THROW(TypeError) << "OpenCL kernel '" << k->name << "' expects "
                               << nargs + k->launch_axes.size() << " arguments, got "
                               << args.size();
    }
    size_t work[6] = {1, 1, 1, 1, 1, 1};
    int work_dim = 1;
    for (size_t i = 0; i < k->launch_axes.size(); ++i) {
      int64_t extent = args[nargs + i].cast<int64_t>();
      if (extent <= 0) return;  // a dynamic dimension of size 0: no work item to run
      work[k->launch_axes[i]] = static_cast<size_t>(extent);
      work_dim = std::max(work_dim, k->launch_axes[i] % 3 + 1);
    }
    Workspace* w = Workspace::Global();
    Device& d = w->Get(current_device);
    std::lock_guard<std::mutex> lock(k->mu);
    cl_kernel kernel = Build(k, w, current_device);

    size_t group = work[3] * work[4] * work[5];
    size_t kernel_limit = 0;
    w->cl.clGetKernelWorkGroupInfo(kernel, d.id, CL_KERNEL_WORK_GROUP_SIZE, sizeof(size_t),
                                   &kernel_limit, nullptr);
    size_t limit = kernel_limit ? std::min(kernel_limit, d.max_work_group_size) : d.max_work_group_size;
    bool dims_ok = work[3] <= d.max_work_item_sizes[0] && work[4] <= d.max_work_item_sizes[1] &&
                   work[5] <= d.max_work_item_sizes[2];
    if (group > limit || !dims_ok) {
      TVM_FFI_THROW(RuntimeError)
          << "OpenCL kernel '" << k->name << "': work-group size " << work[3] << "x" << work[4]
          << "x" << work[5] << " = " << group << " exceeds the limit of " << d.name << ": "
          << limit << " work items per group (kernel " << kernel_limit << ", device "
          << d.max_work_group_size << "), per dimension [" << d.max_work_item_sizes[0] << ", "
          << d.max_work_item_sizes[1] << ", " << d.max_work_item_sizes[2]
          << "]; compile for this device (its max_threads_per_block)";
    }

    const TVMFFIAny* raw = reinterpret_cast<const TVMFFIAny*>(args.data());
    for (size_t i = 0; i < nargs; ++i) {
      DLDataType t = k->arg_types[i];
      cl_int err;
      if (t.code == kDLOpaqueHandle) {
        void* p = raw[i].type_index == kTVMFFIOpaquePtr ? raw[i].v_ptr
                  : raw[i].type_index == kTVMFFINone    ? nullptr
                                                        : args[i].cast<DLTensor*>()->data;
        cl_mem mem = static_cast<cl_mem>(p);
        err = w->cl.clSetKernelArg(kernel, i, sizeof(cl_mem), &mem);
      } else if (t.code == kDLFloat && t.bits == 32) {
        float v = static_cast<float>(args[i].cast<double>());
        err = w->cl.clSetKernelArg(kernel, i, sizeof(v), &v);
      } else if (t.code == kDLFloat && t.bits == 64) {
        double v = args[i].cast<double>();
        err = w->cl.clSetKernelArg(kernel, i, sizeof(v), &v);
      } else if ((t.code == kDLInt || t.code == kDLUInt) && t.bits % 8 == 0 && t.bits <= 64) {
        int64_t v = args[i].cast<int64_t>();  // low bytes first: the narrower integer
        err = w->cl.clSetKernelArg(kernel, i, t.bits / 8, &v);
      } else {
        TVM_FFI_THROW(TypeError) << "OpenCL kernel '" << k->name << "': argument " << i
                                 << " has unsupported type " << ffi::DLDataTypeToString(t);
      }
      if (err != CL_SUCCESS) {
        TVM_FFI_THROW(RuntimeError) << "OpenCL kernel '" << k->name << "': setting argument " << i
                                    << " failed: " << ErrorName(err);
      }
    }
    size_t global[3], local[3];
    for (int i = 0; i < 3; ++i) {
      global[i] = work[i] * work[3 + i];
      local[i] = work[3 + i];
    }
    Profiler* profiler = Profiler::Global();
    cl_event event = nullptr;
    bool profiling = profiler->enabled.load();
    cl_int err = w->cl.clEnqueueNDRangeKernel(d.queue, kernel, work_dim, nullptr, global, local, 0,
                                              nullptr, profiling ? &event : nullptr);
    if (err == CL_SUCCESS && profiling && event != nullptr) {
      profiler->Add(k->name, global, local, work_dim, event);
    }
    if (err != CL_SUCCESS) {
      TVM_FFI_THROW(RuntimeError) << "OpenCL kernel '" << k->name << "' failed to launch on "
                                  << d.name << ": " << ErrorName(err) << " (global " << global[0]
                                  << "x" << global[1] << "x" << global[2] << ", local "
                                  << local[0] << "x" << local[1] << "x" << local[2] << ")";
    }
  }

  ffi::Bytes bytes_;
  std::string source_;
  std::map<std::string, std::unique_ptr<Kernel>> kernels_;
};

TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  refl::GlobalDef()
      // Looked up by TVM's module loader for each imported module of kind "opencl".
      .def("ffi.Module.load_from_bytes.opencl",
           [](ffi::Bytes bytes) { return ffi::Module(ffi::make_object<Module>(bytes)); })
      // TVM's DeviceAPI::Get(kDLOpenCL) calls this and keeps the pointer for the process.
      .def("device_api.opencl",
           []() -> void* {
             static DeviceAPI* api = new DeviceAPI();
             return static_cast<void*>(static_cast<tvm::runtime::DeviceAPI*>(api));
           })
      // For edgert's find_device(): the devices found, as "name | OpenCL version".
      .def("edgert.opencl.devices",
           []() {
             ffi::Array<ffi::String> out;
             for (const auto& d : Workspace::Global()->devices) out.push_back(d.name + " | " + d.version);
             return out;
           })
      .def("edgert.opencl.why_none", []() { return ffi::String(Workspace::Global()->why_none); })
      // [name, OpenCL version, platform name, device type] of device ``index``.
      .def("edgert.opencl.device_info",
           [](int index) {
             Device& d = Workspace::Global()->Get(index);
             return ffi::Array<ffi::String>{d.name, d.version, d.platform, d.type};
           })
      // Profiling on (a profiling queue, each launch's event kept) or off; records kept either way.
      .def("edgert.opencl.profiling", [](bool on) { SetProfiling(on); })
      // Per kernel and work sizes: [name, count, total ns, min ns, max ns, global x y z, local x y z,
      // work dims], after waiting for the launches still running.
      .def("edgert.opencl.profile_records",
           []() {
             Profiler::Global()->Drain(true);
             return Profiler::Global()->Records();
           })
      .def("edgert.opencl.profile_clear", []() { Profiler::Global()->Clear(); })
      // [bytes allocated now, peak bytes, allocations made]; reset_peak: peak = now.
      .def("edgert.opencl.memory",
           []() {
             MemoryStats* m = MemoryStats::Global();
             std::lock_guard<std::mutex> lock(m->mu);
             return ffi::Array<int64_t>{m->current, m->peak, m->allocations};
           })
      .def("edgert.opencl.memory_reset_peak", []() {
        MemoryStats* m = MemoryStats::Global();
        std::lock_guard<std::mutex> lock(m->mu);
        m->peak = m->current;
      });
}

}  // namespace edgert_opencl
