// Host reference for the CUTLASS sm90 2:4 operand layout (tests/test_cutlass.py).
//
//   cutlass_sm90_compress_host {bf16|e4m3|e5m2} M K in.bin out.bin
//
// Reads a row-major (M, K) 2:4 matrix (raw element bytes), writes the compressed values (M, K'/2) row-major
// (K' = K rounded up to CUTLASS's TensorAAlignmentK) followed by the metadata E. Where each value and each 4-bit code goes is CUTLASS's own layout, evaluated on
// the host: Sm90GemmSparseConfig::fill_layoutA / fill_layoutE for the config the sm90 sparse GMMA builder makes
// (operand types sparse_elem<2, T> and sparse_elem<8, uint8_t>, MinTileShapeK = min(tile K, 128): 64 for bf16,
// 128 for 8-bit types). The per-group rule (which entries are kept, the code idx0 | idx1 << 2, the lone-nonzero
// cases, -0 as zero) follows SM90StructuredSparseCompressor, whose kernel only runs on a GPU.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cute/tensor.hpp"
#include "cutlass/gemm/collective/builders/sm90_sparse_config.inl"
#include "cutlass/numeric_types.h"

using namespace cute;

template <class Element, int TileK>
int compress(int M, int K, const std::vector<uint8_t>& in, std::vector<uint8_t>& out) {
  using Raw = cute::uint_bit_t<cute::sizeof_bits_v<Element>>;
  using Config = cutlass::Sm90GemmSparseConfig<cute::sparse_elem<2, Element>, cute::GMMA::Major::K,
                                               cute::sparse_elem<8, uint8_t>, cute::Int<TileK>>;
  constexpr int kESparsity = 8;  // logical elements per metadata byte
  auto problem = make_shape(M, 1, K, 1);
  auto layout_a = Config::fill_layoutA(problem);  // logical (m, k) -> index in sparse_elem<2, T> units
  auto layout_e = Config::fill_layoutE(problem);  // logical (m, k) -> index in sparse_elem<8, uint8_t> units
  const int m_al = cutlass::round_up(M, int(typename Config::TensorEAlignmentM{}));
  const int k_al = cutlass::round_up(K, int(typename Config::TensorEAlignmentK{}));
  const size_t e_bytes = size_t(m_al) * k_al / kESparsity;
  const int k_al_a = cutlass::round_up(K, int(typename Config::TensorAAlignmentK{}));  // compressed rows pad to it
  const size_t v_bytes = size_t(M) * (k_al_a / 2) * sizeof(Raw);
  out.assign(v_bytes + e_bytes, 0);
  const Raw* a = reinterpret_cast<const Raw*>(in.data());
  Raw* values = reinterpret_cast<Raw*>(out.data());
  uint8_t* e = out.data() + v_bytes;
  const Raw magnitude = Raw(~(Raw(1) << (8 * sizeof(Raw) - 1)));  // these types have a negative zero
  for (int m = 0; m < M; ++m) {
    for (int c = 0; c < K / 4; ++c) {
      int idx[2] = {0, 0};
      Raw kept[2] = {0, 0};
      int count = 0;
      for (int j = 0; j < 4; ++j) {
        Raw x = a[size_t(m) * K + 4 * c + j];
        if ((x & magnitude) != 0) {
          if (count == 2) {
            std::fprintf(stderr, "row %d group %d has more than 2 nonzeros\n", m, c);
            return 1;
          }
          idx[count] = j;
          kept[count] = x;
          ++count;
        }
      }
      if (count == 1 && idx[0] == 3) {
        kept[1] = kept[0];
        kept[0] = 0;
        idx[0] = 0;
        idx[1] = 3;
      } else if (count == 1) {
        kept[1] = 0;
        idx[1] = 3;
      }
      const uint8_t code = uint8_t(idx[0] | (idx[1] << 2));
      for (int s = 0; s < 2; ++s) {  // compressed slot 2c+s holds logical column 4c+2s: index / sparsity 2
        int64_t li = layout_a(m, 4 * c + 2 * s, 0);
        values[li / 2] = kept[s];
      }
      int64_t le = layout_e(m, 4 * c, 0);
      e[le / kESparsity] |= uint8_t(code << (4 * ((le % kESparsity) / 4)));
    }
  }
  return 0;
}

int main(int argc, char** argv) {
  if (argc != 6) {
    std::fprintf(stderr, "usage: %s {bf16|e4m3|e5m2} M K in.bin out.bin\n", argv[0]);
    return 2;
  }
  const int M = std::atoi(argv[2]), K = std::atoi(argv[3]);
  const bool wide = std::strcmp(argv[1], "bf16") == 0;
  if (K % 16 || M <= 0) {
    std::fprintf(stderr, "K must be a multiple of 16, M positive\n");
    return 2;
  }
  std::vector<uint8_t> in(size_t(M) * K * (wide ? 2 : 1));
  FILE* f = std::fopen(argv[4], "rb");
  if (!f || std::fread(in.data(), 1, in.size(), f) != in.size()) {
    std::fprintf(stderr, "cannot read %zu bytes from %s\n", in.size(), argv[4]);
    return 2;
  }
  std::fclose(f);
  std::vector<uint8_t> out;
  int rc;
  if (wide) {
    rc = compress<cutlass::bfloat16_t, 64>(M, K, in, out);
  } else if (std::strcmp(argv[1], "e4m3") == 0) {
    rc = compress<cutlass::float_e4m3_t, 128>(M, K, in, out);
  } else if (std::strcmp(argv[1], "e5m2") == 0) {
    rc = compress<cutlass::float_e5m2_t, 128>(M, K, in, out);
  } else {
    std::fprintf(stderr, "unknown type %s\n", argv[1]);
    return 2;
  }
  if (rc) return rc;
  f = std::fopen(argv[5], "wb");
  if (!f || std::fwrite(out.data(), 1, out.size(), f) != out.size()) return 2;
  std::fclose(f);
  return 0;
}
