// XLA FFI handlers for CUTLASS 3.x sm90 2:4 sparse GEMMs (sste_jax). Built for sm_90a only.
//
// D = alpha * A @ B^T with
//   A: (M, K) 2:4 sparse along K, given compressed: values (M, K/2) row-major and metadata E in
//      CUTLASS's sm90 layout (Sm90GemmSparseConfig::fill_layoutE; sste_jax.kernels.cutlass emits both);
//   B: (N, K) row-major (CUTLASS "column-major B");
//   D: (M, N) column-major, i.e. a row-major (N, M) buffer: y = x @ W~ with A = W~^T and B = x;
//   alpha: a float32 scalar in device memory (1 / (scale_A * scale_B) for fp8 operands, else 1).
//
//   sste_cutlass_sparse_bf16(a_values, e, b, alpha; attrs m, n, k) -> d (N, M) bf16
//     bf16 x bf16, tile 128x128x64 (metadata for tile K 64)
//   sste_cutlass_sparse_e4m3(...)   e4m3 x e4m3, tile 128x256x128 (metadata for tile K 128)
//   sste_cutlass_sparse_e5m2(...)   e5m2 x e5m2 (A: the MVUE gradient, B: the input), tile 128x256x128
//   sste_cutlass_compress_{bf16,e4m3,e5m2}(a: (M, K) dense 2:4; attrs m, k) -> (values, e)
//     CUTLASS's own compressor (SM90StructuredSparseCompressor) for the same configs: the golden
//     reference for the JAX emitter sste_jax.kernels.cutlass.emit_sm90 (tests/test_cutlass.py, on a GPU).
//
// Float32 accumulation throughout (no fp8 fast accumulation); cooperative warp-specialised persistent
// kernels, cluster 2x1x1.
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <string>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/transform/device/transform_universal_adapter.hpp"
#include "cutlass/transform/kernel/sparse_gemm_compressor.hpp"
#include "cutlass/util/packed_stride.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace cute;

template <class ElementA_, class ElementB_, class TileShape_>
struct SparseGemm {
  using ElementA = ElementA_;
  using ElementB = ElementB_;
  using ElementD = cutlass::bfloat16_t;
  using TileShape = TileShape_;
  using ClusterShape = Shape<_2, _1, _1>;
  static constexpr int kAlignA = 256 / cutlass::sizeof_bits<ElementA>::value;  // logical: 16 bytes compressed
  static constexpr int kAlignB = 128 / cutlass::sizeof_bits<ElementB>::value;
  static constexpr int kAlignD = 128 / cutlass::sizeof_bits<ElementD>::value;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, cutlass::layout::ColumnMajor, kAlignD,
      ElementD, cutlass::layout::ColumnMajor, kAlignD, cutlass::epilogue::TmaWarpSpecializedCooperative>::CollectiveOp;

  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp, ElementA, cutlass::layout::RowMajor, kAlignA,
      ElementB, cutlass::layout::ColumnMajor, kAlignB, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue,
                                                      cutlass::gemm::PersistentScheduler>;
  using Device = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

using GemmBf16 = SparseGemm<cutlass::bfloat16_t, cutlass::bfloat16_t, Shape<_128, _128, _64>>;
using GemmE4m3 = SparseGemm<cutlass::float_e4m3_t, cutlass::float_e4m3_t, Shape<_128, _256, _128>>;
using GemmE5m2 = SparseGemm<cutlass::float_e5m2_t, cutlass::float_e5m2_t, Shape<_128, _256, _128>>;

ffi::Error CudaError(const char* what, cudaError_t e) {
  return ffi::Error::Internal(std::string(what) + " failed: " + cudaGetErrorString(e));
}

ffi::Error SmCount(int* out) {
  static std::mutex mutex;
  static std::map<int, int> counts;
  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess) return CudaError("cudaGetDevice", e);
  std::lock_guard<std::mutex> lock(mutex);
  auto it = counts.find(device);
  if (it == counts.end()) {
    int n = 0;
    e = cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device);
    if (e != cudaSuccess) return CudaError("cudaDeviceGetAttribute", e);
    it = counts.emplace(device, n).first;
  }
  *out = it->second;
  return ffi::Error::Success();
}

template <class G>
ffi::Error Run(cudaStream_t stream, ffi::AnyBuffer a_values, ffi::AnyBuffer e, ffi::AnyBuffer b,
               ffi::Buffer<ffi::F32> alpha, ffi::Result<ffi::AnyBuffer> d, int64_t m, int64_t n, int64_t k) {
  using Kernel = typename G::Kernel;
  using Mainloop = typename G::Mainloop;
  using SparseConfig = typename Mainloop::SparseConfig;
  auto problem = make_shape(int(m), int(n), int(k), 1);

  typename Kernel::Arguments args;
  args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
  args.problem_shape = problem;
  args.mainloop.ptr_A = static_cast<typename Mainloop::ElementA const*>(a_values.untyped_data());
  args.mainloop.layout_a = SparseConfig::fill_layoutA(problem);
  args.mainloop.ptr_B = static_cast<typename G::ElementB const*>(b.untyped_data());
  args.mainloop.dB = cutlass::make_cute_packed_stride(typename Kernel::StrideB{}, make_shape(int(n), int(k), 1));
  args.mainloop.ptr_E = static_cast<typename Mainloop::ElementE const*>(e.untyped_data());
  args.mainloop.layout_e = SparseConfig::fill_layoutE(problem);
  args.epilogue.thread.alpha_ptr = alpha.typed_data();
  args.epilogue.thread.beta = 0.0f;
  args.epilogue.ptr_C = nullptr;
  args.epilogue.dC = cutlass::make_cute_packed_stride(typename Kernel::StrideC{}, make_shape(int(m), int(n), 1));
  args.epilogue.ptr_D = static_cast<typename G::ElementD*>(d->untyped_data());
  args.epilogue.dD = cutlass::make_cute_packed_stride(typename Kernel::StrideD{}, make_shape(int(m), int(n), 1));
  cudaError_t ce = cudaGetDevice(&args.hw_info.device_id);
  if (ce != cudaSuccess) return CudaError("cudaGetDevice", ce);
  if (ffi::Error err = SmCount(&args.hw_info.sm_count); err.failure()) return err;

  typename G::Device gemm;
  cutlass::Status status = gemm.can_implement(args);
  if (status != cutlass::Status::kSuccess)
    return ffi::Error::InvalidArgument(std::string("CUTLASS sm90 sparse GEMM cannot run M=") + std::to_string(m) +
                                       " N=" + std::to_string(n) + " K=" + std::to_string(k) + ": " +
                                       cutlassGetStatusString(status));
  size_t workspace_bytes = G::Device::get_workspace_size(args);
  void* workspace = nullptr;
  if (workspace_bytes) {
    ce = cudaMallocAsync(&workspace, workspace_bytes, stream);
    if (ce != cudaSuccess) return CudaError("cudaMallocAsync", ce);
  }
  status = gemm.initialize(args, workspace, stream);
  if (status == cutlass::Status::kSuccess) status = gemm.run(stream);
  if (workspace) cudaFreeAsync(workspace, stream);
  if (status != cutlass::Status::kSuccess)
    return ffi::Error::Internal(std::string("CUTLASS sm90 sparse GEMM failed: ") + cutlassGetStatusString(status));
  ce = cudaGetLastError();
  if (ce != cudaSuccess) return CudaError("CUTLASS sm90 sparse GEMM launch", ce);
  return ffi::Error::Success();
}

template <class G>
ffi::Error Compress(cudaStream_t stream, ffi::AnyBuffer a, ffi::Result<ffi::AnyBuffer> values,
                    ffi::Result<ffi::AnyBuffer> e, int64_t m, int64_t k) {
  using Mainloop = typename G::Mainloop;
  using ProblemShape = Shape<int, int, int, int>;
  using Kernel = cutlass::transform::kernel::StructuredSparseCompressor<
      ProblemShape, typename G::ElementA, cutlass::layout::RowMajor, typename Mainloop::SparseConfig, cutlass::arch::Sm90>;
  using Compressor = cutlass::transform::device::TransformUniversalAdapter<Kernel>;
  ProblemShape problem = make_shape(int(m), 1, int(k), 1);
  auto stride_a = cutlass::make_cute_packed_stride(cutlass::gemm::TagToStrideA_t<cutlass::layout::RowMajor>{},
                                                   make_shape(int(m), int(k), 1));
  typename Compressor::Arguments args{problem,
                                      {a.untyped_data(), stride_a, values->untyped_data(), e->untyped_data()},
                                      {}};
  cudaError_t ce = cudaGetDevice(&args.hw_info.device_id);
  if (ce != cudaSuccess) return CudaError("cudaGetDevice", ce);
  if (ffi::Error err = SmCount(&args.hw_info.sm_count); err.failure()) return err;
  Compressor op;
  cutlass::Status status = op.can_implement(args);
  if (status != cutlass::Status::kSuccess)
    return ffi::Error::InvalidArgument(std::string("CUTLASS sm90 compressor cannot run: ") +
                                       cutlassGetStatusString(status));
  // The E buffer's padding is only partly written by the kernel: clear it first.
  ce = cudaMemsetAsync(e->untyped_data(), 0, e->size_bytes(), stream);
  if (ce == cudaSuccess) ce = cudaMemsetAsync(values->untyped_data(), 0, values->size_bytes(), stream);
  if (ce != cudaSuccess) return CudaError("cudaMemsetAsync", ce);
  size_t workspace_bytes = Compressor::get_workspace_size(args);
  void* workspace = nullptr;
  if (workspace_bytes) {
    ce = cudaMallocAsync(&workspace, workspace_bytes, stream);
    if (ce != cudaSuccess) return CudaError("cudaMallocAsync", ce);
  }
  status = op.run(args, workspace, stream);
  if (workspace) cudaFreeAsync(workspace, stream);
  if (status != cutlass::Status::kSuccess)
    return ffi::Error::Internal(std::string("CUTLASS sm90 compressor failed: ") + cutlassGetStatusString(status));
  ce = cudaGetLastError();
  if (ce != cudaSuccess) return CudaError("CUTLASS sm90 compressor launch", ce);
  return ffi::Error::Success();
}

#define SSTE_COMPRESS_BIND                           \
  ffi::Ffi::Bind()                                   \
      .Ctx<ffi::PlatformStream<cudaStream_t>>()      \
      .Arg<ffi::AnyBuffer>()                         \
      .Ret<ffi::AnyBuffer>()                         \
      .Ret<ffi::AnyBuffer>()                         \
      .Attr<int64_t>("m")                            \
      .Attr<int64_t>("k")

#define SSTE_BIND                                    \
  ffi::Ffi::Bind()                                   \
      .Ctx<ffi::PlatformStream<cudaStream_t>>()      \
      .Arg<ffi::AnyBuffer>()                         \
      .Arg<ffi::AnyBuffer>()                         \
      .Arg<ffi::AnyBuffer>()                         \
      .Arg<ffi::Buffer<ffi::F32>>()                  \
      .Ret<ffi::AnyBuffer>()                         \
      .Attr<int64_t>("m")                            \
      .Attr<int64_t>("n")                            \
      .Attr<int64_t>("k")

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SsteCutlassSparseBf16, Run<GemmBf16>, SSTE_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(SsteCutlassSparseE4m3, Run<GemmE4m3>, SSTE_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(SsteCutlassSparseE5m2, Run<GemmE5m2>, SSTE_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(SsteCutlassCompressBf16, Compress<GemmBf16>, SSTE_COMPRESS_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(SsteCutlassCompressE4m3, Compress<GemmE4m3>, SSTE_COMPRESS_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(SsteCutlassCompressE5m2, Compress<GemmE5m2>, SSTE_COMPRESS_BIND);
