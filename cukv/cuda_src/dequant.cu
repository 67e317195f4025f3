// cukv/cuda_src/dequant.cu: padded cache dequantize, cukv.dequantize_cache (SPEC §6), and FBGEMM's
// physical-layout variant (SPEC §10.2).
//
// dequantize_cache_rows<FMT, G>: for both caches (blockIdx.z: 0 = K, 1 = V) of a K/V pair in format FMT
//   (rows.cuh: bf16, fp8 inline or external words, fp8_head with float32 scales [B, N_KVH], int4:gG),
//   writes the bf16 output in ONE pass:
//     logical mode (phys = 0): out[b, t, h, :] for every t < max_len; rows t < len(b) are the decoded
//       logical row (b, t, h), every other row (padding, or a row behind an out-of-range page id) is +0.
//       len(b) = clamp(seqlens[b], 0, T), T = min(capacity, max_len).
//     physical mode (phys = 1, paged only): out has the cache's physical shape [1, P*S, N_KVH, D]; only
//       data rows are written (to their physical row), the host zero-fills the rest beforehand.
//   Cache row (b, t, h): contiguous  byte ((b*MAX_T + t)*N_KVH + h) * R
//                        paged       byte ((bt[b, t/S]*S + t%S)*N_KVH + h) * R, page id in [0, P)
//   External fp8 words and fp8_head scales are indexed like the cache row and by b*N_KVH + h.
// Thread layout: blockDim = (D/8, ROWS); thread (c, y) handles chunk c (8 elements, one 16-byte store)
// of `iters` rows of one lane, ROWS apart (blockIdx.y strides over lanes, blockIdx.z picks K or V).
// Offsets are 64-bit; a power-of-two page size uses shifts.
#include "rows.cuh"

#define DQ_MAX_ITERS 4

template <bool VEC>
__device__ __forceinline__ void store_zero8(u16* p) {
  if (VEC) {
    *reinterpret_cast<uint4*>(p) = make_uint4(0u, 0u, 0u, 0u);
  } else {
#pragma unroll
    for (int k = 0; k < 8; ++k) p[k] = 0;
  }
}

// One lane b: rows q = t*N_KVH + h of this thread (q0, q0 + ROWS, ..., `iters` <= DQ_MAX_ITERS of
// them). The loop has a constant trip count and is unrolled, so the loads of later rows can be issued
// before the stores of earlier ones (every pointer is __restrict__). Row indices within a lane are
// 32-bit (the host keeps max_len * N_KVH < 2^31); cache and output offsets are 64-bit.
template <int FMT, int G, bool VEC>
__device__ __forceinline__ void dequant_lane(
    const u8* __restrict__ cache, const int* __restrict__ words, const float* __restrict__ scales,
    u16* __restrict__ out, const int* __restrict__ block_tables, int b, int len, int nkv, int D,
    i64 R, int max_t, int max_len, int page_size, int page_shift, int max_pages, int n_pages,
    int paged, int phys, int iters) {
  const int c = threadIdx.x;
  const u32 rpb = blockDim.y;
  const u32 n_rows = (u32)max_len * (u32)nkv;
  u32 q = blockIdx.x * (rpb * (u32)iters) + threadIdx.y;
  if (q >= n_rows) return;
  u32 t = q / (u32)nkv;
  u32 h = q - t * (u32)nkv;
  const u32 dt = rpb / (u32)nkv, dh = rpb - dt * (u32)nkv;
  const int* bt_row = paged ? block_tables + (i64)b * max_pages : nullptr;
  u16* out_lane = out + (i64)b * n_rows * D + 8 * c;
#pragma unroll
  for (int it = 0; it < DQ_MAX_ITERS; ++it) {
    if (it >= iters || q >= n_rows) break;
    bool data = t < (u32)len;
    i64 crow = 0;  // cache row index (row-major over [*, *, N_KVH])
    if (data) {
      if (paged) {
        u32 pg, off;
        if (page_shift >= 0) {
          pg = t >> page_shift;
          off = t & (u32)(page_size - 1);
        } else {
          pg = t / (u32)page_size;
          off = t - pg * (u32)page_size;
        }
        const int page = bt_row[pg];
        data = (unsigned)page < (unsigned)n_pages;
        crow = ((i64)page * page_size + off) * nkv + h;
      } else {
        crow = ((i64)b * max_t + t) * nkv + h;
      }
    }
    u16* dst = phys ? out + crow * D + 8 * c : out_lane + (i64)q * D;
    if (data) {
      float x[1][8];
      const float s = FMT == FMT_FP8_HEAD ? scales[(i64)b * nkv + h] : 0.0f;
      decode_row<FMT, G, 32, 1, VEC>(cache + crow * R, words ? words + crow : nullptr, s, D, c, x);
      store_bf16x8<VEC>(dst, x[0]);
    } else if (!phys) {
      store_zero8<VEC>(dst);
    }
    q += rpb;
    t += dt;
    h += dh;
    if (h >= (u32)nkv) { h -= nkv; ++t; }
  }
}

template <int FMT, int G>
__global__ void dequantize_cache_rows(
    const u8* __restrict__ cache_k, const u8* __restrict__ cache_v, const int* __restrict__ words_k,
    const int* __restrict__ words_v, const float* __restrict__ scales_k,
    const float* __restrict__ scales_v, const int* __restrict__ seqlens,
    const int* __restrict__ block_tables, u16* __restrict__ out_k, u16* __restrict__ out_v, int B,
    int nkv, int D, i64 R, int max_t, int max_len, int T, int page_size, int page_shift,
    int max_pages, int n_pages, int paged, int phys, int iters, int vec) {
  const bool is_v = blockIdx.z == 1;
  const u8* cache = is_v ? cache_v : cache_k;
  const int* words = is_v ? words_v : words_k;
  const float* scales = is_v ? scales_v : scales_k;
  u16* out = is_v ? out_v : out_k;
  for (int b = blockIdx.y; b < B; b += gridDim.y) {
    int len = seqlens[b];
    len = len < 0 ? 0 : (len > T ? T : len);   // validate=False clamp
    if (phys && len == 0) continue;
    if (vec)
      dequant_lane<FMT, G, true>(cache, words, scales, out, block_tables, b, len, nkv, D, R, max_t,
                                 max_len, page_size, page_shift, max_pages, n_pages, paged, phys, iters);
    else
      dequant_lane<FMT, G, false>(cache, words, scales, out, block_tables, b, len, nkv, D, R, max_t,
                                  max_len, page_size, page_shift, max_pages, n_pages, paged, phys, iters);
  }
}
