// XLA FFI handlers for cuSPARSELt 2:4 sparse GEMMs (sste_jax).
//
// Layout ("linear", TN): A is a row-major (M, K) matrix, 2:4 sparse along K; B is row-major (N, K);
// C is row-major (N, M) = B @ A^T. In cuSPARSELt's column-major terms: op(A) = T on a (K, M) matrix,
// op(B) = N on a (K, N) matrix, C is (M, N). This is the layout every input type supports (fp8 needs it).
//
//   sste_cslt_compress(a: (M, K) bf16|f8e4m3fn) -> uint8[compressed_size]
//   sste_cslt_matmul(a_compressed: uint8[...], b: (N, K); attrs m, k) -> c: (N, M) bf16|f32
//
// Handles, plans and workspaces are cached per device and per (M, N, K, input, output) type.
#include <cuda_runtime.h>
#include <cusparseLt.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <tuple>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

std::string LtError(const char* what, cusparseStatus_t s) {
  std::ostringstream os;
  os << "cuSPARSELt " << what << " failed: " << cusparseLtGetErrorName(s) << " (" << cusparseLtGetErrorString(s)
     << ")";
  return os.str();
}

#define LT_CHECK(expr)                                                   \
  do {                                                                   \
    cusparseStatus_t _s = (expr);                                        \
    if (_s != CUSPARSE_STATUS_SUCCESS) return ffi::Error::Internal(LtError(#expr, _s)); \
  } while (0)

#define CUDA_CHECK(expr)                                                                       \
  do {                                                                                         \
    cudaError_t _e = (expr);                                                                   \
    if (_e != cudaSuccess)                                                                     \
      return ffi::Error::Internal(std::string(#expr " failed: ") + cudaGetErrorString(_e));    \
  } while (0)

std::mutex g_mutex;

ffi::Error GetHandle(cusparseLtHandle_t** out) {
  int device = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  static std::map<int, cusparseLtHandle_t*> handles;
  auto it = handles.find(device);
  if (it == handles.end()) {
    auto* h = new cusparseLtHandle_t;
    LT_CHECK(cusparseLtInit(h));
    it = handles.emplace(device, h).first;
  }
  *out = it->second;
  return ffi::Error::Success();
}

ffi::Error ToCuda(ffi::DataType t, cudaDataType* out) {
  switch (t) {
    case ffi::DataType::BF16: *out = CUDA_R_16BF; return ffi::Error::Success();
    case ffi::DataType::F8E4M3FN: *out = CUDA_R_8F_E4M3; return ffi::Error::Success();
    case ffi::DataType::F32: *out = CUDA_R_32F; return ffi::Error::Success();
    default: return ffi::Error::InvalidArgument("cuSPARSELt path supports bfloat16, float8_e4m3fn inputs and bfloat16/float32 outputs");
  }
}

// The structured (sparse) descriptor of a row-major (M, K) A, seen column-major as (K, M), op(A) = T.
// (Describing it row-major with op(A) = N ran no faster on an H100: docs/kernels.md.)
ffi::Error SparseDescriptor(cusparseLtHandle_t* h, cusparseLtMatDescriptor_t* d, int64_t m, int64_t k,
                            cudaDataType t) {
  LT_CHECK(cusparseLtStructuredDescriptorInit(h, d, k, m, k, 16, t, CUSPARSE_ORDER_COL,
                                              CUSPARSELT_SPARSITY_50_PERCENT));
  return ffi::Error::Success();
}

struct Plan {
  cusparseLtMatDescriptor_t a, b, c;
  cusparseLtMatmulDescriptor_t matmul;
  cusparseLtMatmulAlgSelection_t alg;
  cusparseLtMatmulPlan_t plan;
  void* workspace = nullptr;
  size_t workspace_size = 0;
  bool searched = false;
};

// The search may pick a split-K kernel that needs more workspace than the default plan: size the
// workspace generously before it and re-check after it.
constexpr size_t kSearchWorkspace = size_t{64} << 20;

ffi::Error EnsureWorkspace(cusparseLtHandle_t* h, Plan* p, size_t at_least) {
  size_t need = 0;
  LT_CHECK(cusparseLtMatmulGetWorkspace(h, &p->plan, &need));
  need = need > at_least ? need : at_least;
  if (need > p->workspace_size) {
    if (p->workspace) CUDA_CHECK(cudaFree(p->workspace));
    CUDA_CHECK(cudaMalloc(&p->workspace, need));
    p->workspace_size = need;
  }
  return ffi::Error::Success();
}

using PlanKey = std::tuple<int, int64_t, int64_t, int64_t, int, int>;

ffi::Error GetPlan(cusparseLtHandle_t* h, int64_t m, int64_t n, int64_t k, cudaDataType in, cudaDataType out,
                   Plan** result) {
  int device = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  static std::map<PlanKey, Plan*> plans;
  PlanKey key{device, m, n, k, static_cast<int>(in), static_cast<int>(out)};
  auto it = plans.find(key);
  if (it != plans.end()) {
    *result = it->second;
    return ffi::Error::Success();
  }
  auto* p = new Plan;
  if (auto e = SparseDescriptor(h, &p->a, m, k, in); e.failure()) return e;
  LT_CHECK(cusparseLtDenseDescriptorInit(h, &p->b, k, n, k, 16, in, CUSPARSE_ORDER_COL));
  LT_CHECK(cusparseLtDenseDescriptorInit(h, &p->c, m, n, m, 16, out, CUSPARSE_ORDER_COL));
  LT_CHECK(cusparseLtMatmulDescriptorInit(h, &p->matmul, CUSPARSE_OPERATION_TRANSPOSE, CUSPARSE_OPERATION_NON_TRANSPOSE, &p->a, &p->b, &p->c, &p->c,
                                          CUSPARSE_COMPUTE_32F));
  LT_CHECK(cusparseLtMatmulAlgSelectionInit(h, &p->alg, &p->matmul, CUSPARSELT_MATMUL_ALG_DEFAULT));
  LT_CHECK(cusparseLtMatmulPlanInit(h, &p->plan, &p->matmul, &p->alg));
  if (auto e = EnsureWorkspace(h, p, kSearchWorkspace); e.failure()) return e;
  plans.emplace(key, p);
  *result = p;
  return ffi::Error::Success();
}

ffi::Error CompressedSize(int64_t m, int64_t k, cudaDataType t, size_t* size, size_t* buffer) {
  cusparseLtHandle_t* h;
  if (auto e = GetHandle(&h); e.failure()) return e;
  cusparseLtMatDescriptor_t d;
  if (auto e = SparseDescriptor(h, &d, m, k, t); e.failure()) return e;
  LT_CHECK(cusparseLtSpMMACompressedSize2(h, &d, size, buffer));
  LT_CHECK(cusparseLtMatDescriptorDestroy(&d));
  return ffi::Error::Success();
}

ffi::Error CompressImpl(cudaStream_t stream, ffi::AnyBuffer a, ffi::Result<ffi::AnyBuffer> out) {
  auto dims = a.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("sste_cslt_compress: A must be 2-D (M, K)");
  cudaDataType t;
  if (auto e = ToCuda(a.element_type(), &t); e.failure()) return e;
  std::lock_guard<std::mutex> lock(g_mutex);
  cusparseLtHandle_t* h;
  if (auto e = GetHandle(&h); e.failure()) return e;
  struct Packer {
    cusparseLtMatDescriptor_t d;
    size_t size = 0, buffer = 0;
    void* scratch = nullptr;
  };
  int device = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  // Descriptor, sizes and scratch per shape/type: rebuilding them cost ~0.35 ms per call on an H100.
  static std::map<std::tuple<int, int64_t, int64_t, int>, Packer*> packers;
  auto pkey = std::make_tuple(device, dims[0], dims[1], static_cast<int>(t));
  auto pit = packers.find(pkey);
  if (pit == packers.end()) {
    auto* pk = new Packer;
    if (auto e = SparseDescriptor(h, &pk->d, dims[0], dims[1], t); e.failure()) return e;
    LT_CHECK(cusparseLtSpMMACompressedSize2(h, &pk->d, &pk->size, &pk->buffer));
    if (pk->buffer) CUDA_CHECK(cudaMalloc(&pk->scratch, pk->buffer));
    pit = packers.emplace(pkey, pk).first;
  }
  Packer* pk = pit->second;
  size_t size = pk->size;
  if (out->size_bytes() != size) {
    std::ostringstream os;
    os << "sste_cslt_compress: output has " << out->size_bytes() << " bytes, cuSPARSELt needs " << size;
    return ffi::Error::InvalidArgument(os.str());
  }
  LT_CHECK(cusparseLtSpMMACompress2(h, &pk->d, 1, CUSPARSE_OPERATION_TRANSPOSE, a.untyped_data(),
                                    out->untyped_data(), pk->scratch, stream));
  CUDA_CHECK(cudaGetLastError());
  return ffi::Error::Success();
}

ffi::Error MatmulImpl(cudaStream_t stream, ffi::AnyBuffer a_compressed, ffi::AnyBuffer b, int64_t m, int64_t k,
                      int64_t a_type, ffi::Result<ffi::AnyBuffer> c) {
  auto bd = b.dimensions();
  auto cd = c->dimensions();
  if (bd.size() != 2 || bd[1] != k || cd.size() != 2 || cd[0] != bd[0] || cd[1] != m)
    return ffi::Error::InvalidArgument("sste_cslt_matmul: need B (N, K) and C (N, M) matching the attributes");
  cudaDataType in, out;
  if (auto e = ToCuda(b.element_type(), &in); e.failure()) return e;
  if (auto e = ToCuda(c->element_type(), &out); e.failure()) return e;
  if (static_cast<int64_t>(in) != a_type)
    return ffi::Error::InvalidArgument("sste_cslt_matmul: A was compressed from another dtype than B's");
  std::lock_guard<std::mutex> lock(g_mutex);
  cusparseLtHandle_t* h;
  if (auto e = GetHandle(&h); e.failure()) return e;
  Plan* p;
  if (auto e = GetPlan(h, m, bd[0], k, in, out, &p); e.failure()) return e;
  float alpha = 1.0f, beta = 0.0f;
  cudaStream_t streams[1] = {stream};
  if (!p->searched) {  // pick the fastest kernel once per plan (writes C, which is overwritten below)
    LT_CHECK(cusparseLtMatmulSearch(h, &p->plan, &alpha, a_compressed.untyped_data(), b.untyped_data(), &beta,
                                    c->untyped_data(), c->untyped_data(), p->workspace, streams, 1));
    CUDA_CHECK(cudaStreamSynchronize(stream));
    if (auto e = EnsureWorkspace(h, p, 0); e.failure()) return e;
    p->searched = true;
  }
  LT_CHECK(cusparseLtMatmul(h, &p->plan, &alpha, a_compressed.untyped_data(), b.untyped_data(), &beta,
                            c->untyped_data(), c->untyped_data(), p->workspace, streams, 1));
  CUDA_CHECK(cudaGetLastError());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SsteCsltCompress, CompressImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SsteCsltMatmul, MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Attr<int64_t>("m")
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("a_type")
                                  .Ret<ffi::AnyBuffer>());

// Host query used at trace time: bytes of the compressed A for a (M, K) matrix of `type`
// (a cudaDataType value). Returns 0 on success, else a cuSPARSELt/CUDA error code (> 0).
extern "C" int sste_cslt_compressed_size(int64_t m, int64_t k, int type, int64_t* size) {
  std::lock_guard<std::mutex> lock(g_mutex);
  size_t s = 0, buffer = 0;
  ffi::Error e = CompressedSize(m, k, static_cast<cudaDataType>(type), &s, &buffer);
  if (e.failure()) return 1;
  *size = static_cast<int64_t>(s);
  return 0;
}
