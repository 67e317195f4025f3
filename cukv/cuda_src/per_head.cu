// cukv/cuda_src/per_head.cu: cukv.quantize_qkv_per_head, the FP8 per-head Q/K/V quantizer (SPEC §2.4, §7).
//
// per_head_scales: scr[b, 0] = s_q(b), scr[b, 1+h] = s_k(b,h), scr[b, 1+N_KVH+h] = s_v(b,h) from
//   amax [B, HH] (fp32, one rounding per operation, NaN propagating min/max; no fminf/fmaxf):
//     s_q(b)   = max(RN(min(max_{h<N_H} amax[b,h], 12000) / 448), S_MIN)
//     s_k(b,h) = max(RN(min(RN(64 * amax[b, N_H+h]), 12000) / 448), S_MIN)    (V: N_H+N_KVH+h)
// quantize_qkv_rows<VEC>: heads j of each packed token i, j < N_H (Q heads), then N_KVH K heads and
//   N_KVH V heads when `kv` is set. Per token i: lane b = token_lane[i] (or i), slot c = cache_pos[i].
//   The token is kept unless i >= valid_tokens, c < 0 (-1: skip), b outside [0, B), c outside [0, capacity)
//   (capacity < 0: no cache), or it writes K/V and its page id is outside [0, P).
//     Q row:  out[i, j, :] = E4M3(clamp(RN(f32(xq[i,j,:]) * RN(1/s_q(b))), +-448)); zero bytes if skipped.
//             Head slot 0's thread of chunk c also writes scale_q[b, k] = s_q(b) (k = c, c+D/8, ...)
//             and, if the token writes K/V, qparam_k[b, k] = s_k(b,k), qparam_v[b, k] = s_v(b,k).
//     K/V row (kept, kv, not precomputed): cache row (b, c, h) <- xk[i, h] with RN(1/s_k(b,h)); V likewise.
//   Equal values may be stored to one scale address by several tokens (no float atomics; deterministic).
// Thread layout: blockDim = (D/8, HS, TPB): TPB tokens per block, HS head slots per token.
// xq/xk/xv are strided views (token and head strides in elements, unit last-axis stride).
#include "rows.cuh"

__device__ __forceinline__ float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }
__device__ __forceinline__ float nan_min(float a, float b) { return (a < b || a != a) ? a : b; }

// max(RN(min(a, 12000) / 448), S_MIN), NaN propagating.
__device__ __forceinline__ float scale_recipe(float a) {
  const float s = __fdiv_rn(nan_min(a, 12000.0f), 448.0f);
  return nan_max(s, CUKV_S_MIN);
}

// scr[b, j] = scale and scr[B + b, j] = RN(1/scale) (scr is [2, B, 1 + 2 N_KVH]) for j = 0 (Q),
// 1 + h (K head h), 1 + N_KVH + h (V head h); scale_q [B, N_KVH] is zero-filled (quantize_qkv_rows then
// writes the lanes with a kept token), so the op needs no separate memset.
__global__ void per_head_scales(const float* __restrict__ amax, int B, int n_h, int nkv,
                                float* __restrict__ scr, float* __restrict__ scale_q) {
  const int ncol = 1 + 2 * nkv;
  const i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx < (i64)B * nkv) scale_q[idx] = 0.0f;
  if (idx >= (i64)B * ncol) return;
  const int b = (int)(idx / ncol), j = (int)(idx - (i64)b * ncol);
  const float* a = amax + (i64)b * (n_h + 2 * nkv);
  float s;
  if (j == 0) {
    float m = n_h > 0 ? a[0] : 0.0f;
    for (int h = 1; h < n_h; ++h) m = nan_max(m, a[h]);
    s = scale_recipe(m);
  } else {
    s = scale_recipe(__fmul_rn(64.0f, a[n_h + j - 1]));
  }
  scr[idx] = s;
  scr[(i64)B * ncol + idx] = __frcp_rn(s);
}

// Token-major: thread (c, y, z) handles chunk c of token i = blockIdx.x * blockDim.z + z, heads
// j = y, y + HS, ... (HS = blockDim.y) in rounds of NH: the token's lane, slot, page and Q scale
// are looked up once; in each round the 16-byte loads of all its heads, and the K/V heads' inverse
// scales, are issued before any store. Codes go out as one 8-byte store per head (VEC).
// wkv implies load_kv (a kept, non-precomputed token), so y is always loaded where it is encoded.
// NH: heads per thread and round (the host picks 4 or 8; 8 keeps twice the bytes in flight per thread at
// 80 registers). scale_q null: no scale is written (a bench probe of the kernel alone).

// The 8 e4m3 codes of E4M3(clamp(RN(y * inv), +-448)) (SPEC §2.4), stored at p (8-byte aligned if VEC).
template <bool VEC>
__device__ __forceinline__ void store_fp8_head_chunk(u8* p, const float (&y)[8], float inv) {
  float q[8];
#pragma unroll
  for (int k = 0; k < 8; ++k) q[k] = __fmul_rn(y[k], inv);   // the encoder clamps to +-448, keeps NaN
  const u32 lo = pack4_e4m3(q[0], q[1], q[2], q[3]), hi = pack4_e4m3(q[4], q[5], q[6], q[7]);
  if (VEC) *reinterpret_cast<uint2*>(p) = make_uint2(lo, hi);
  else store_u8x8<false>(p, lo, hi);
}

template <bool VEC, int NH>
__global__ void __launch_bounds__(256) quantize_qkv_rows(
    const u16* __restrict__ xq, i64 q_ts, i64 q_hs, const u16* __restrict__ xk, i64 k_ts, i64 k_hs,
    const u16* __restrict__ xv, i64 v_ts, i64 v_hs, const float* __restrict__ scr,
    u8* __restrict__ cache_k, u8* __restrict__ cache_v,
    const int* __restrict__ cache_pos, const int* __restrict__ token_lane,
    const u8* __restrict__ precomputed, float* __restrict__ qparam_k, float* __restrict__ qparam_v,
    float* __restrict__ scale_q, u8* __restrict__ out, const int* __restrict__ block_tables,
    int max_pages, int page_size, int n_pages, int max_t, int paged, i64 capacity,
    const long long* __restrict__ valid_ptr, i64 valid_val, int B, int B_T, int n_h, int nkv, int D,
    int kv) {
  const int c = threadIdx.x;
  const int hs = blockDim.y;
  const i64 i = (i64)blockIdx.x * blockDim.z + threadIdx.z;
  if (i >= B_T) return;
  const int hhx = kv ? n_h + 2 * nkv : n_h;
  const int ncol = 1 + 2 * nkv;
  const i64 valid = valid_ptr ? (i64)*valid_ptr : valid_val;
  const int b = token_lane ? token_lane[i] : (int)i;
  const int cp = cache_pos[i];
  bool kept = i < valid && cp >= 0 && b >= 0 && b < B && (capacity < 0 || (i64)cp < capacity);
  bool wkv = kv && kept && !(precomputed && precomputed[i]);
  i64 crow = 0;
  if (wkv) {
    if (paged) {
      const int pg = cp / page_size;
      const int page = block_tables[(i64)b * max_pages + pg];
      if ((unsigned)page >= (unsigned)n_pages) kept = wkv = false;
      crow = ((i64)page * page_size + (cp - pg * page_size)) * nkv;
    } else {
      crow = ((i64)b * max_t + cp) * nkv;
    }
  }
  const float* inv_b = scr + ((i64)B + b) * ncol;   // scr[1, b, :], the inverse scales
  const float inv_q = kept ? inv_b[0] : 0.0f;
  // K/V rows are read unless the token is precomputed; the loads do not wait for the lane / slot /
  // page lookups above (every address below is in bounds for any i < B_T), so they overlap them.
  const bool load_kv = kv && !(precomputed && precomputed[i]);
  const u16* q_row = xq + i * q_ts + 8 * c;
  const u16* k_row = xk + i * k_ts + 8 * c;
  const u16* v_row = xv + i * v_ts + 8 * c;
  u8* o_row = out + i * n_h * D + 8 * c;
  for (int j0 = threadIdx.y; j0 < hhx; j0 += NH * hs) {
    u32 raw[NH][4];   // the 8 bf16 of each head's chunk, widened only when encoded (fewer registers)
    float inv[NH];
#pragma unroll
    for (int k = 0; k < NH; ++k) {
      const int j = j0 + k * hs;
      inv[k] = inv_q;
      if (j >= hhx) continue;
      const u16* src = nullptr;
      if (j < n_h) {
        src = q_row + j * q_hs;
      } else if (load_kv) {
        const bool is_v = j >= n_h + nkv;
        const int h = j - n_h - (is_v ? nkv : 0);
        src = is_v ? v_row + h * v_hs : k_row + h * k_hs;
        if (wkv) inv[k] = inv_b[1 + (is_v ? nkv : 0) + h];
      }
      if (!src) continue;
      if (VEC) {
        const uint4 u = *reinterpret_cast<const uint4*>(src);
        raw[k][0] = u.x; raw[k][1] = u.y; raw[k][2] = u.z; raw[k][3] = u.w;
      } else {
#pragma unroll
        for (int e = 0; e < 4; ++e) raw[k][e] = (u32)src[2 * e] | ((u32)src[2 * e + 1] << 16);
      }
    }
#pragma unroll
    for (int k = 0; k < NH; ++k) {
      const int j = j0 + k * hs;
      if (j >= hhx) continue;
      float y[8];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        y[2 * e] = __uint_as_float(raw[k][e] << 16);
        y[2 * e + 1] = __uint_as_float(raw[k][e] & 0xffff0000u);
      }
      if (j < n_h) {
        u8* dst = o_row + (i64)j * D;
        if (kept) store_fp8_head_chunk<VEC>(dst, y, inv[k]);
        else if (VEC) *reinterpret_cast<uint2*>(dst) = make_uint2(0u, 0u);
        else store_u8x8<false>(dst, 0u, 0u);
      } else if (wkv) {
        const bool is_v = j >= n_h + nkv;
        const int h = j - n_h - (is_v ? nkv : 0);
        store_fp8_head_chunk<VEC>((is_v ? cache_v : cache_k) + (crow + h) * D + 8 * c, y, inv[k]);
      }
    }
  }
  if (kept && scale_q && threadIdx.y == 0) {
    const float* sc = scr + (i64)b * ncol;
    for (int k = c; k < nkv; k += blockDim.x) {
      scale_q[(i64)b * nkv + k] = sc[0];
      if (wkv) {
        qparam_k[(i64)b * nkv + k] = sc[1 + k];
        qparam_v[(i64)b * nkv + k] = sc[1 + nkv + k];
      }
    }
  }
}
