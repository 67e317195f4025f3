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
// A thread first issues the loads of all its rows (page ids first when paged), then decodes and stores
// them (dequant_lane), so its loads overlap instead of forming one dependent chain per row.
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

// The bytes one thread needs from one row for its chunk c (8 elements), loaded apart from the
// arithmetic so a thread issues the loads of all its rows before it decodes any:
//   bf16      v[0..3] = the 8 stored values
//   fp8       v[0..1] = 8 codes, w = the qparam word (inline at the row front, or external)
//   fp8_head  v[0..1] = 8 codes, w = the bits of the float32 scale
//   int4      v[0] = 8 nibbles, w = the word of the chunk's group, at byte `woff` of the row (groups of
//             a multiple of 8 elements, so a chunk lies in one group)
struct RawChunk {
  u32 v[4];
  u32 w;
};

template <int FMT, int G, bool VEC>
__device__ __forceinline__ void load_chunk(const u8* row, const int* word, const float* scale, int c,
                                           int woff, RawChunk& r) {
  if (FMT == FMT_BF16) {
    const u16* p = reinterpret_cast<const u16*>(row) + 8 * c;
    if (VEC) {
      const uint4 u = *reinterpret_cast<const uint4*>(p);
      r.v[0] = u.x; r.v[1] = u.y; r.v[2] = u.z; r.v[3] = u.w;
    } else {
#pragma unroll
      for (int k = 0; k < 4; ++k) r.v[k] = (u32)p[2 * k] | ((u32)p[2 * k + 1] << 16);
    }
  } else if (FMT == FMT_INT4) {
    r.w = load_u32<VEC>(row + woff);
    r.v[0] = load_u32<VEC>(row + 4 * G + 4 * c);
  } else {
    if (FMT == FMT_FP8) r.w = word ? (u32)*word : load_u32<VEC>(row);
    else r.w = __float_as_uint(*scale);
    load_u8x8<VEC>(row + (FMT == FMT_FP8 && !word ? 4 : 0) + 8 * c, r.v[0], r.v[1]);
  }
}

// The decoded values of a RawChunk (SPEC §2.3-§2.5; the arithmetic of rows.cuh's decode_row).
template <int FMT>
__device__ __forceinline__ void decode_chunk(const RawChunk& r, float (&x)[8]) {
  if (FMT == FMT_BF16) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      x[2 * k] = __uint_as_float(r.v[k] << 16);
      x[2 * k + 1] = __uint_as_float(r.v[k] & 0xffff0000u);
    }
  } else if (FMT == FMT_INT4) {
    const u16 scale = (u16)(r.w & 0xffffu), shift = (u16)(r.w >> 16);
#pragma unroll
    for (int k = 0; k < 8; ++k)
      x[k] = f16_to_f32(f16_fma(u4_to_f16((r.v[0] >> (4 * k)) & 0xfu), scale, shift));
  } else {
    const float scale = FMT == FMT_FP8 ? f16_to_f32((u16)(r.w & 0xffffu)) : __uint_as_float(r.w);
    const float shift = FMT == FMT_FP8 ? f16_to_f32((u16)(r.w >> 16)) : 0.0f;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const float q = e4m3_to_f32((r.v[k >> 2] >> (8 * (k & 3))) & 0xffu);
      x[k] = FMT == FMT_FP8 ? __fadd_rn(__fmul_rn(q, scale), shift) : __fmul_rn(q, scale);
    }
  }
}

// One lane b: rows q = t*N_KVH + h of this thread (q0, q0 + ROWS, ..., `iters` <= DQ_MAX_ITERS of
// them), in three phases over the unrolled rows: (1) row indices and, when paged, every page id;
// (2) every row's loads (RawChunk); (3) decode and store. So a thread has all its rows' loads in
// flight at once, and a paged row costs one extra dependent load per thread, not per row. Row indices
// within a lane are 32-bit (the host keeps max_len * N_KVH < 2^31); cache and output offsets are 64-bit.
// Rows of int4 caches whose groups are not a multiple of 8 elements go through dequant_lane_general.
template <int FMT, int G, bool VEC>
__device__ __forceinline__ void dequant_lane(
    const u8* __restrict__ cache, const int* __restrict__ words, const float* __restrict__ scales,
    u16* __restrict__ out, const int* __restrict__ block_tables, int b, int len, int nkv, int D,
    i64 R, int max_t, int max_len, int page_size, int page_shift, int max_pages, int n_pages,
    int paged, int phys, int iters) {
  const int c = threadIdx.x;
  const u32 rpb = blockDim.y;
  const u32 n_rows = (u32)max_len * (u32)nkv;
  const u32 q0 = blockIdx.x * (rpb * (u32)iters) + threadIdx.y;
  if (q0 >= n_rows) return;
  const u32 dt = rpb / (u32)nkv, dh = rpb - dt * (u32)nkv;
  u32 t = q0 / (u32)nkv;
  u32 h = q0 - t * (u32)nkv;
  bool live[DQ_MAX_ITERS], data[DQ_MAX_ITERS];
  u32 tr[DQ_MAX_ITERS], hr[DQ_MAX_ITERS];
#pragma unroll
  for (int it = 0; it < DQ_MAX_ITERS; ++it) {
    live[it] = it < iters && q0 + (u32)it * rpb < n_rows;
    data[it] = live[it] && t < (u32)len;
    tr[it] = t;
    hr[it] = h;
    t += dt;
    h += dh;
    if (h >= (u32)nkv) { h -= nkv; ++t; }
  }
  i64 crow[DQ_MAX_ITERS];   // cache row index (row-major over [*, *, N_KVH])
  if (paged) {
    const int* bt_row = block_tables + (i64)b * max_pages;
    int page[DQ_MAX_ITERS];
    u32 off[DQ_MAX_ITERS];
#pragma unroll
    for (int it = 0; it < DQ_MAX_ITERS; ++it) {
      u32 pg;
      if (page_shift >= 0) {
        pg = tr[it] >> page_shift;
        off[it] = tr[it] & (u32)(page_size - 1);
      } else {
        pg = tr[it] / (u32)page_size;
        off[it] = tr[it] - pg * (u32)page_size;
      }
      page[it] = data[it] ? bt_row[pg] : 0;
    }
#pragma unroll
    for (int it = 0; it < DQ_MAX_ITERS; ++it) {
      data[it] = data[it] && (unsigned)page[it] < (unsigned)n_pages;
      crow[it] = ((i64)page[it] * page_size + off[it]) * nkv + hr[it];
    }
  } else {
#pragma unroll
    for (int it = 0; it < DQ_MAX_ITERS; ++it) crow[it] = ((i64)b * max_t + tr[it]) * nkv + hr[it];
  }
  const int woff = FMT == FMT_INT4 ? 4 * ((8 * c) / (D / G)) : 0;
  RawChunk raw[DQ_MAX_ITERS];
#pragma unroll
  for (int it = 0; it < DQ_MAX_ITERS; ++it)
    if (data[it])
      load_chunk<FMT, G, VEC>(cache + crow[it] * R, words ? words + crow[it] : nullptr,
                              FMT == FMT_FP8_HEAD ? scales + ((i64)b * nkv + hr[it]) : nullptr, c, woff,
                              raw[it]);
  u16* out_lane = out + (i64)b * n_rows * D + 8 * c;
#pragma unroll
  for (int it = 0; it < DQ_MAX_ITERS; ++it) {
    if (!live[it]) break;
    u16* dst = phys ? out + crow[it] * D + 8 * c : out_lane + (i64)(q0 + (u32)it * rpb) * D;
    if (data[it]) {
      float x[8];
      decode_chunk<FMT>(raw[it], x);
      store_bf16x8<VEC>(dst, x);
    } else if (!phys) {
      store_zero8<VEC>(dst);
    }
  }
}

// Any group layout (int4 groups of a size not a multiple of 8): one row at a time through
// rows.cuh's decode_row.
template <int FMT, int G, bool VEC>
__device__ __noinline__ void dequant_lane_general(
    const u8* __restrict__ cache, const int* __restrict__ words, const float* __restrict__ scales,
    u16* __restrict__ out, const int* __restrict__ block_tables, int b, int len, int nkv, int D,
    i64 R, int max_t, int max_len, int page_size, int max_pages, int n_pages, int paged, int phys,
    int iters) {
  const int c = threadIdx.x;
  const u32 rpb = blockDim.y;
  const u32 n_rows = (u32)max_len * (u32)nkv;
  u32 q = blockIdx.x * (rpb * (u32)iters) + threadIdx.y;
  for (int it = 0; it < iters && q < n_rows; ++it, q += rpb) {
    const u32 t = q / (u32)nkv, h = q - t * (u32)nkv;
    bool data = t < (u32)len;
    i64 crow = 0;
    if (data) {
      if (paged) {
        const int page = block_tables[(i64)b * max_pages + t / (u32)page_size];
        data = (unsigned)page < (unsigned)n_pages;
        crow = ((i64)page * page_size + t % (u32)page_size) * nkv + h;
      } else {
        crow = ((i64)b * max_t + t) * nkv + h;
      }
    }
    u16* dst = phys ? out + crow * D + 8 * c : out + ((i64)b * n_rows + q) * D + 8 * c;
    if (data) {
      float x[1][8];
      const float s = FMT == FMT_FP8_HEAD ? scales[(i64)b * nkv + h] : 0.0f;
      decode_row<FMT, G, 32, 1, VEC>(cache + crow * R, words ? words + crow : nullptr, s, D, c, x);
      store_bf16x8<VEC>(dst, x[0]);
    } else if (!phys) {
      store_zero8<VEC>(dst);
    }
  }
}

template <int FMT, int G>
__global__ void __launch_bounds__(1024) dequantize_cache_rows(
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
  // int4 groups that split a chunk (D/G not a multiple of 8) take the general path
  const bool general = FMT == FMT_INT4 && ((D / G) & 7) != 0;
  for (int b = blockIdx.y; b < B; b += gridDim.y) {
    int len = seqlens[b];
    len = len < 0 ? 0 : (len > T ? T : len);   // validate=False clamp
    if (phys && len == 0) continue;
    if (general) {
      if (vec)
        dequant_lane_general<FMT, G, true>(cache, words, scales, out, block_tables, b, len, nkv, D, R,
                                           max_t, max_len, page_size, max_pages, n_pages, paged, phys, iters);
      else
        dequant_lane_general<FMT, G, false>(cache, words, scales, out, block_tables, b, len, nkv, D, R,
                                            max_t, max_len, page_size, max_pages, n_pages, paged, phys, iters);
    } else if (vec) {
      dequant_lane<FMT, G, true>(cache, words, scales, out, block_tables, b, len, nkv, D, R, max_t,
                                 max_len, page_size, page_shift, max_pages, n_pages, paged, phys, iters);
    } else {
      dequant_lane<FMT, G, false>(cache, words, scales, out, block_tables, b, len, nkv, D, R, max_t,
                                  max_len, page_size, page_shift, max_pages, n_pages, paged, phys, iters);
    }
  }
}
