// cukv/cuda_src/codec.cu: the row codec, cukv.quantize / cukv.dequantize (SPEC §2.7).
//
// quantize_rows<InT, FMT, G, W, V>: n_rows rows of D elements (InT = bf16_t / f16_t / float, C-contiguous)
//   -> n_rows rows of R bytes in FMT (2D bytes for bf16) (rows.cuh gives the byte layout). fp8 with `words` non-null writes
//   the qparam word there (external) and R = D; fp8_head reads one float32 scale per row.
// dequantize_rows<FMT, G, W, V>: the inverse, to bf16 rows of D elements.
// One team of W lanes per row; lanes hold V chunks of 8 elements. `vec` selects 16-byte (input) and
// 4/16-byte (output) accesses; the host sets it when every base pointer is aligned for them.
// quantize_rows keeps whole warps together (teams past the end redo the last row and store the same
// bytes), so its team shuffles use the full-warp mask.
#define CUKV_FULL_WARP_TEAMS
#include "rows.cuh"

// Each team encodes CUKV_CODEC_ROWS(V) consecutive rows: all their loads are issued before the first
// reduction, so more bytes are in flight and two shuffle chains interleave.
#define CUKV_CODEC_ROWS(V) ((V) <= 2 ? 2 : 1)

#ifndef CUKV_QUANT_MIN_BLOCKS
#define CUKV_QUANT_MIN_BLOCKS 1
#endif

// Launched with 128-thread blocks.
template <typename InT, int FMT, int G, int W, int V>
__global__ void __launch_bounds__(128, CUKV_QUANT_MIN_BLOCKS) quantize_rows(const InT* __restrict__ x, i64 n_rows, int D, u8* __restrict__ out, int R,
                              int* __restrict__ words, const float* __restrict__ scale, int vec) {
  constexpr int NR = CUKV_CODEC_ROWS(V);
  const i64 tid = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  const int lane = threadIdx.x % W;
  // A warp leaves only as a whole; a team past the end works on the last row (same bytes, written twice).
  if ((tid & ~(i64)31) / W * NR >= n_rows) return;
  const i64 row0 = tid / W * NR;
  float y[NR][V][8];
#pragma unroll
  for (int r = 0; r < NR; ++r) {
    const i64 row = min(row0 + r, n_rows - 1);
    const InT* src = x + row * (i64)D;
#pragma unroll (V <= 4 ? V : 1)
    for (int c = 0; c < V; ++c) {
      if (!chunk_valid<W>(c, lane, D)) continue;
      if (vec) Chunk<InT, true>::load(src + chunk_elem<W>(c, lane), y[r][c]);
      else Chunk<InT, false>::load(src + chunk_elem<W>(c, lane), y[r][c]);
    }
  }
#pragma unroll
  for (int r = 0; r < NR; ++r) {
    const i64 row = min(row0 + r, n_rows - 1);
    u8* dst = out + row * (i64)R;
    int* w = words ? words + row : nullptr;
    const float inv = FMT == FMT_FP8_HEAD ? __frcp_rn(scale[row]) : 0.0f;
    if (vec) encode_row<FMT, G, W, V, true>(y[r], D, lane, dst, w, inv);
    else encode_row<FMT, G, W, V, false>(y[r], D, lane, dst, w, inv);
  }
}

template <int FMT, int G, int W, int V>
__global__ void dequantize_rows(const u8* __restrict__ rows, i64 n_rows, int D, int R,
                                const int* __restrict__ words, const float* __restrict__ scale,
                                u16* __restrict__ out, int vec) {
  const i64 row = ((i64)blockIdx.x * blockDim.x + threadIdx.x) / W;
  const int lane = threadIdx.x % W;
  if (row >= n_rows) return;
  const u8* src = rows + row * (i64)R;
  const int* w = words ? words + row : nullptr;
  const float s = FMT == FMT_FP8_HEAD ? scale[row] : 0.0f;
  float x[V][8];
  if (vec) decode_row<FMT, G, W, V, true>(src, w, s, D, lane, x);
  else decode_row<FMT, G, W, V, false>(src, w, s, D, lane, x);
  u16* dst = out + row * (i64)D;
#pragma unroll (V <= 4 ? V : 1)
  for (int c = 0; c < V; ++c) {
    if (!chunk_valid<W>(c, lane, D)) continue;
    if (vec) store_bf16x8<true>(dst + chunk_elem<W>(c, lane), x[c]);
    else store_bf16x8<false>(dst + chunk_elem<W>(c, lane), x[c]);
  }
}
