// LasadStep on onnxruntime's CUDA execution provider (the contract: plugins/contract.py).
//
// | # | input       | shape               | dtype                 | # | output        | shape           |
// |---|-------------|---------------------|-----------------------|---|---------------|-----------------|
// | 0 | qfv         | [rows, 2HK + HV]    | fp32 / fp16 / bf16    | 0 | o             | [rows, H, V]    |
// | 1 | lower_bound | [HK]                | fp32                  | 1 | present_state | [rows, H, K, V] |
// | 2 | past_state  | [rows, H, K, V]     | fp32                  |   |               |                 |
// | 3 | start       | [rows]              | bool (one per row)    |   |               |                 |
//
// The kernel is lasad_engine/ops/lasad/step.py's `lasad_step_plugin_kernel`, compiled by Triton to
// PTX and handed over in the node's kernel_* attributes (plugins/ort/__init__.py lists them). It is
// the TensorRT plugin's launch: (qfv, lb, past, start, H, S, o, present) then null pointers for
// Triton's scratch parameters; grid (kernel_grid_x, rows * H), kernel_block threads.
//
// Only onnxruntime's C API is used (onnxruntime_c_api.h, ORT_API_VERSION >= 16). The CUDA driver
// is opened with dlopen, so the library builds with a C++ compiler alone (no CUDA toolkit) and
// loads on machines without a GPU (registration needs no driver; creating a kernel does).

#include <dlfcn.h>

#include <climits>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "onnxruntime_c_api.h"

namespace {

using CUresult = int;
using CUcontext = struct CUctx_st*;
using CUmodule = struct CUmod_st*;
using CUfunction = struct CUfunc_st*;
using CUstream = struct CUstream_st*;
constexpr int kMaxDynamicSharedAttribute = 8;  // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES

struct Driver {
  CUresult (*CtxGetCurrent)(CUcontext*);
  CUresult (*CtxPushCurrent)(CUcontext);
  CUresult (*CtxPopCurrent)(CUcontext*);
  CUresult (*StreamGetCtx)(CUstream, CUcontext*);
  CUresult (*ModuleLoadData)(CUmodule*, const void*);
  CUresult (*ModuleUnload)(CUmodule);
  CUresult (*ModuleGetFunction)(CUfunction*, CUmodule, const char*);
  CUresult (*FuncSetAttribute)(CUfunction, int, int);
  CUresult (*LaunchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                           CUstream, void**, void**);
  CUresult (*GetErrorString)(CUresult, const char**);
  std::string error;  // why the driver could not be opened; empty when it was
};

template <typename F>
bool Symbol(void* lib, const char* name, F* out) {
  *out = reinterpret_cast<F>(dlsym(lib, name));
  return *out != nullptr;
}

const Driver& GetDriver() {
  static Driver d = [] {
    Driver d{};
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) {
      d.error = "cannot open libcuda.so.1 (the NVIDIA driver): LasadStep on CUDA needs it";
      return d;
    }
    bool ok = Symbol(lib, "cuCtxGetCurrent", &d.CtxGetCurrent) &&
              Symbol(lib, "cuCtxPushCurrent_v2", &d.CtxPushCurrent) &&
              Symbol(lib, "cuCtxPopCurrent_v2", &d.CtxPopCurrent) &&
              Symbol(lib, "cuStreamGetCtx", &d.StreamGetCtx) &&
              Symbol(lib, "cuModuleLoadData", &d.ModuleLoadData) &&
              Symbol(lib, "cuModuleUnload", &d.ModuleUnload) &&
              Symbol(lib, "cuModuleGetFunction", &d.ModuleGetFunction) &&
              Symbol(lib, "cuFuncSetAttribute", &d.FuncSetAttribute) &&
              Symbol(lib, "cuLaunchKernel", &d.LaunchKernel) &&
              Symbol(lib, "cuGetErrorString", &d.GetErrorString);
    if (!ok) d.error = "libcuda.so.1 lacks a CUDA driver function LasadStep needs";
    return d;
  }();
  return d;
}

std::string DriverError(const Driver& d, CUresult r, const char* what) {
  const char* msg = nullptr;
  if (d.GetErrorString != nullptr) d.GetErrorString(r, &msg);
  return std::string("LasadStep: ") + what + " failed: " + (msg != nullptr ? msg : "CUDA error " + std::to_string(r));
}

struct StepKernel {
  const OrtApi* api = nullptr;
  std::string ptx, entry;
  int64_t grid_x = 0, block = 0, shared = 0, params = 0, heads = 0, head_k = 0, head_v = 0;
  std::mutex mu;
  CUcontext ctx = nullptr;
  CUmodule module = nullptr;
  CUfunction fn = nullptr;
};

OrtStatus* Fail(const OrtApi* api, const std::string& msg) { return api->CreateStatus(ORT_FAIL, msg.c_str()); }

OrtStatus* IntAttr(const OrtApi* api, const OrtKernelInfo* info, const char* name, int64_t* out) {
  OrtStatus* s = api->KernelInfoGetAttribute_int64(info, name, out);
  if (s == nullptr) return nullptr;
  api->ReleaseStatus(s);
  return Fail(api, std::string("LasadStep: the node has no int attribute ") + name +
                       " (the kernel_* attributes are added by lasad_plugins.ort.attach_kernels)");
}

OrtStatus* StringAttr(const OrtApi* api, const OrtKernelInfo* info, const char* name, std::string* out) {
  size_t size = 0;
  OrtStatus* s = api->KernelInfoGetAttribute_string(info, name, nullptr, &size);
  if (s != nullptr) {
    api->ReleaseStatus(s);
    return Fail(api, std::string("LasadStep: the node has no string attribute ") + name +
                         " (the kernel_* attributes are added by lasad_plugins.ort.attach_kernels)");
  }
  std::vector<char> buf(size);
  if ((s = api->KernelInfoGetAttribute_string(info, name, buf.data(), &size)) != nullptr) return s;
  out->assign(buf.data(), size > 0 ? size - 1 : 0);
  return nullptr;
}

// Load the PTX into `ctx` (current on this thread) once.
OrtStatus* LoadModule(StepKernel* k, CUcontext ctx) {
  const Driver& d = GetDriver();
  CUresult r = d.ModuleLoadData(&k->module, k->ptx.c_str());
  if (r != 0) return Fail(k->api, DriverError(d, r, "loading the step kernel's PTX (cuModuleLoadData)"));
  if ((r = d.ModuleGetFunction(&k->fn, k->module, k->entry.c_str())) != 0)
    return Fail(k->api, DriverError(d, r, "finding the kernel entry (cuModuleGetFunction)"));
  if (k->shared > 48 * 1024 && (r = d.FuncSetAttribute(k->fn, kMaxDynamicSharedAttribute, (int)k->shared)) != 0)
    return Fail(k->api, DriverError(d, r, "raising the kernel's shared memory limit"));
  k->ctx = ctx;
  return nullptr;
}

OrtStatus* ORT_API_CALL CreateStepKernel(const OrtCustomOp*, const OrtApi* api, const OrtKernelInfo* info, void** out) {
  auto* k = new StepKernel();
  k->api = api;
  OrtStatus* s = nullptr;
  if ((s = StringAttr(api, info, "kernel_ptx", &k->ptx)) || (s = StringAttr(api, info, "kernel_name", &k->entry)) ||
      (s = IntAttr(api, info, "kernel_grid_x", &k->grid_x)) || (s = IntAttr(api, info, "kernel_block", &k->block)) ||
      (s = IntAttr(api, info, "kernel_shared", &k->shared)) || (s = IntAttr(api, info, "kernel_params", &k->params)) ||
      (s = IntAttr(api, info, "num_heads", &k->heads)) || (s = IntAttr(api, info, "head_k_dim", &k->head_k)) ||
      (s = IntAttr(api, info, "head_v_dim", &k->head_v))) {
    delete k;
    return s;
  }
  if (k->params < 8) {
    delete k;
    return Fail(api, "LasadStep: kernel_params < 8: the PTX is not the 8-argument step launch");
  }
  const Driver& d = GetDriver();
  if (!d.error.empty()) {
    delete k;
    return Fail(api, "LasadStep: " + d.error);
  }
  // Onnxruntime creates kernels on the thread that makes the session, where its CUDA provider made
  // the device current: load there, outside any graph capture. Without a current context, load at
  // the first run instead (a regular run: onnxruntime captures only after those).
  CUcontext ctx = nullptr;
  if (d.CtxGetCurrent(&ctx) == 0 && ctx != nullptr && (s = LoadModule(k, ctx)) != nullptr) {
    delete k;
    return s;
  }
  *out = k;
  return nullptr;
}

OrtStatus* Shape(const OrtApi* api, const OrtValue* v, std::vector<int64_t>* dims) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  OrtStatus* s = api->GetTensorTypeAndShape(v, &info);
  if (s != nullptr) return s;
  size_t n = 0;
  if ((s = api->GetDimensionsCount(info, &n)) == nullptr) {
    dims->resize(n);
    s = api->GetDimensions(info, dims->data(), n);
  }
  api->ReleaseTensorTypeAndShapeInfo(info);
  return s;
}

OrtStatus* Pointer(const OrtApi* api, const OrtValue* v, void** p) {
  return api->GetTensorMutableData(const_cast<OrtValue*>(v), p);
}

OrtStatus* ORT_API_CALL ComputeStep(void* op_kernel, OrtKernelContext* context) {
  auto* k = static_cast<StepKernel*>(op_kernel);
  const OrtApi* api = k->api;
  const Driver& d = GetDriver();
  const OrtValue *qfv = nullptr, *lb = nullptr, *past = nullptr, *start = nullptr;
  OrtStatus* s = nullptr;
  if ((s = api->KernelContext_GetInput(context, 0, &qfv)) || (s = api->KernelContext_GetInput(context, 1, &lb)) ||
      (s = api->KernelContext_GetInput(context, 2, &past)) || (s = api->KernelContext_GetInput(context, 3, &start)))
    return s;
  std::vector<int64_t> qdims, sdims;
  if ((s = Shape(api, qfv, &qdims)) || (s = Shape(api, past, &sdims))) return s;
  const int64_t H = k->heads, K = k->head_k, V = k->head_v;
  if (qdims.size() != 2 || qdims[1] != 2 * H * K + H * V || sdims.size() != 4 || sdims[0] != qdims[0] ||
      sdims[1] != H || sdims[2] != K || sdims[3] != V)
    return Fail(api, "LasadStep: qfv must be [rows, 2HK + HV] and past_state [rows, H, K, V] for the node's H, K, V");
  const int64_t rows = qdims[0];
  const int64_t odims[3] = {rows, H, V};
  OrtValue *o = nullptr, *present = nullptr;
  if ((s = api->KernelContext_GetOutput(context, 0, odims, 3, &o)) ||
      (s = api->KernelContext_GetOutput(context, 1, sdims.data(), 4, &present)))
    return s;
  if (rows == 0) return nullptr;
  void* stream = nullptr;
  if ((s = api->KernelContext_GetGPUComputeStream(context, &stream))) return s;
  CUcontext stream_ctx = nullptr;
  CUresult r = d.StreamGetCtx(static_cast<CUstream>(stream), &stream_ctx);
  if (r != 0) return Fail(api, DriverError(d, r, "finding onnxruntime's stream context (cuStreamGetCtx)"));
  {
    std::lock_guard<std::mutex> lock(k->mu);
    if (k->module == nullptr) {
      d.CtxPushCurrent(stream_ctx);
      s = LoadModule(k, stream_ctx);
      CUcontext popped = nullptr;
      d.CtxPopCurrent(&popped);
      if (s != nullptr) return s;
    } else if (k->ctx != stream_ctx) {
      return Fail(api, "LasadStep: the kernel was loaded for another CUDA context than onnxruntime's stream uses");
    }
  }
  void *p_qfv, *p_lb, *p_past, *p_start, *p_o, *p_present;
  if ((s = Pointer(api, qfv, &p_qfv)) || (s = Pointer(api, lb, &p_lb)) || (s = Pointer(api, past, &p_past)) ||
      (s = Pointer(api, start, &p_start)) || (s = Pointer(api, o, &p_o)) || (s = Pointer(api, present, &p_present)))
    return s;
  int32_t h32 = static_cast<int32_t>(H), s32 = static_cast<int32_t>(qdims[1]);
  std::vector<void*> null_scratch(k->params - 8, nullptr);
  std::vector<void*> args = {&p_qfv, &p_lb, &p_past, &p_start, &h32, &s32, &p_o, &p_present};
  for (auto& n : null_scratch) args.push_back(&n);
  r = d.LaunchKernel(k->fn, (unsigned)k->grid_x, (unsigned)(rows * H), 1, (unsigned)k->block, 1, 1,
                     (unsigned)k->shared, static_cast<CUstream>(stream), args.data(), nullptr);
  if (r != 0) return Fail(api, DriverError(d, r, "launching the step kernel (cuLaunchKernel)"));
  return nullptr;
}

void ORT_API_CALL DestroyStep(void* op_kernel) {
  auto* k = static_cast<StepKernel*>(op_kernel);
  const Driver& d = GetDriver();
  if (k->module != nullptr && d.error.empty()) {
    d.CtxPushCurrent(k->ctx);
    d.ModuleUnload(k->module);
    CUcontext popped = nullptr;
    d.CtxPopCurrent(&popped);
  }
  delete k;
}

// One OrtCustomOp per activation type of qfv and o: onnxruntime picks the one whose types match.
struct StepOp : OrtCustomOp {
  ONNXTensorElementDataType activation;
  explicit StepOp(ONNXTensorElementDataType t) : OrtCustomOp{}, activation(t) {
    version = ORT_API_VERSION;
    GetName = [](const OrtCustomOp*) { return "LasadStep"; };
    GetExecutionProviderType = [](const OrtCustomOp*) { return "CUDAExecutionProvider"; };
    GetInputTypeCount = [](const OrtCustomOp*) -> size_t { return 4; };
    GetOutputTypeCount = [](const OrtCustomOp*) -> size_t { return 2; };
    GetInputType = [](const OrtCustomOp* op, size_t i) {
      if (i == 0) return static_cast<const StepOp*>(op)->activation;
      return i == 3 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    };
    GetOutputType = [](const OrtCustomOp* op, size_t i) {
      return i == 0 ? static_cast<const StepOp*>(op)->activation : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    };
    GetInputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
    GetOutputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
    GetInputMemoryType = [](const OrtCustomOp*, size_t) { return OrtMemTypeDefault; };
    GetVariadicInputMinArity = [](const OrtCustomOp*) { return 1; };
    GetVariadicInputHomogeneity = [](const OrtCustomOp*) { return 0; };
    GetVariadicOutputMinArity = [](const OrtCustomOp*) { return 1; };
    GetVariadicOutputHomogeneity = [](const OrtCustomOp*) { return 0; };
    CreateKernelV2 = CreateStepKernel;
    KernelComputeV2 = ComputeStep;
    KernelDestroy = DestroyStep;
    GetStartVersion = [](const OrtCustomOp*) { return 1; };
    GetEndVersion = [](const OrtCustomOp*) { return INT_MAX; };
  }
};

}  // namespace

extern "C" {

// The contract's version of the op this library implements (plugins/contract.py OP_VERSION).
const char* LasadOrtOpInfo() { return "ai.lasad::LasadStep v1 (CUDAExecutionProvider; fp32, fp16, bf16)"; }

// Called by SessionOptions.register_custom_ops_library.
OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(16);
  if (api == nullptr) {  // every onnxruntime has version 1 of the API, enough to say why
    return api_base->GetApi(1)->CreateStatus(ORT_FAIL, "the lasad LasadStep library needs onnxruntime >= 1.16");
  }
  static StepOp ops[] = {StepOp(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT), StepOp(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16),
                         StepOp(ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16)};
  static OrtCustomOpDomain* domain = nullptr;
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  OrtStatus* s = nullptr;
  if (domain == nullptr) {
    if ((s = api->CreateCustomOpDomain("ai.lasad", &domain))) return s;
    for (auto& op : ops)
      if ((s = api->CustomOpDomain_Add(domain, &op))) return s;
  }
  return api->AddCustomOpDomain(options, domain);
}

}  // extern "C"
