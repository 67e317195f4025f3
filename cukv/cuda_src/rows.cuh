// cukv/cuda_src/rows.cuh: encode / decode one cache row with a team of W lanes (SPEC §2.3-§2.5, §11.4).
//
// A row of D floats is held as y[V][8] per lane (common.cuh: chunk c of lane l covers elements
// [(c*W + l)*8, +8); chunks at or past D are ignored). Every lane of the team must call the encoders
// (they reduce across the team); decoders are per lane.
//
// Row bytes (R = last axis of a uint8 cache row):
//   FMT_BF16      R = D elements of bf16
//   FMT_FP8       [scale f16][shift f16][D e4m3 codes]             R = D + 4 (inline)
//                 [D e4m3 codes] + int32 word (scale | shift<<16)   R = D     (external)
//   FMT_FP8_HEAD  [D e4m3 codes], float32 scale per (lane, KV head) R = D
//   FMT_INT4      [G x (scale f16, shift f16)][D/2 bytes, even element in the low nibble]  R = D/2 + 4G
// Every rounding is the one SPEC fixes; files including this header compile with --fmad=false.
#pragma once
#include "common.cuh"

#define FMT_BF16 0
#define FMT_FP8 1
#define FMT_FP8_HEAD 2
#define FMT_INT4 3

#define CUKV_NAN_WORD 0x7E007E00u
#define CUKV_NAN_HALF 0x7E00u

// Byte offset of the codes / nibbles inside a row.
template <int FMT, int G>
__device__ __forceinline__ int row_payload_offset(bool external) {
  return FMT == FMT_FP8 ? (external ? 0 : 4) : (FMT == FMT_INT4 ? 4 * G : 0);
}

template <int W>
__device__ __forceinline__ bool chunk_valid(int c, int lane, int D) { return (c * W + lane) * 8 < D; }

template <int W>
__device__ __forceinline__ int chunk_elem(int c, int lane) { return (c * W + lane) * 8; }

__device__ __forceinline__ u32 pack4_e4m3(float a, float b, float c, float d) {
  return f32_to_e4m3(a) | (f32_to_e4m3(b) << 8) | (f32_to_e4m3(c) << 16) | (f32_to_e4m3(d) << 24);
}

// ----------------------------------------------------------------------------------------- bf16
template <int W, int V, bool VEC>
__device__ __forceinline__ void encode_bf16_row(const float (&y)[V][8], int D, int lane, u16* row) {
#pragma unroll CUKV_UNROLL_V
  for (int c = 0; c < V; ++c)
    if (chunk_valid<W>(c, lane, D)) store_bf16x8<VEC>(row + chunk_elem<W>(c, lane), y[c]);
}

// ----------------------------------------------------------------------------------------- fp8
// Per-row asymmetric FP8 (SPEC §2.3). `word` null: qparams inline at the row front; else external.
template <int W, int V, bool VEC>
__device__ __forceinline__ void encode_fp8_row(const float (&y)[V][8], int D, int lane, u8* row,
                                               int* word) {
  float mn = __int_as_float(0x7f800000), mx = -__int_as_float(0x7f800000);
  u32 bad = 0;
#pragma unroll CUKV_UNROLL_V
  for (int c = 0; c < V; ++c)
    if (chunk_valid<W>(c, lane, D))
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        bad |= !is_finite(y[c][k]);
        mn = fminf(mn, y[c][k]);
        mx = fmaxf(mx, y[c][k]);
      }
  mn = team_min<W>(mn);
  mx = team_max<W>(mx);
  bad = team_or<W>(bad);
  float h = __fdiv_rn(__fsub_rn(mx, mn), 2.0f);
  h = h < 32750.0f ? h : 32750.0f;
  float s = __fdiv_rn(h, 448.0f);
  s = s > CUKV_S_MIN ? s : CUKV_S_MIN;
  const float z = __fadd_rn(mn, __fmul_rn(448.0f, s));
  const float inv = __frcp_rn(s);
  const u32 w = bad ? CUKV_NAN_WORD : ((u32)f32_to_f16(s) | ((u32)f32_to_f16(z) << 16));
  u8* codes = row + (word ? 0 : 4);
#pragma unroll CUKV_UNROLL_V
  for (int c = 0; c < V; ++c) {
    if (!chunk_valid<W>(c, lane, D)) continue;
    float q[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) q[k] = clamp448(__fmul_rn(__fsub_rn(y[c][k], z), inv));
    u32 lo = pack4_e4m3(q[0], q[1], q[2], q[3]), hi = pack4_e4m3(q[4], q[5], q[6], q[7]);
    if (bad) lo = hi = 0x7f7f7f7fu;
    store_u8x8<VEC>(codes + chunk_elem<W>(c, lane), lo, hi);
  }
  if (lane == 0) {
    if (word) *word = (int)w;
    else store_u32<VEC>(row, w);
  }
}

// ----------------------------------------------------------------------------------------- fp8_head
// Symmetric FP8 with a given scale: q = E4M3(clamp(RN(y * inv), +-448)), inv = RN(1/s) (SPEC §2.4).
template <int W, int V, bool VEC>
__device__ __forceinline__ void encode_fp8_head_row(const float (&y)[V][8], int D, int lane, u8* row,
                                                    float inv) {
#pragma unroll CUKV_UNROLL_V
  for (int c = 0; c < V; ++c) {
    if (!chunk_valid<W>(c, lane, D)) continue;
    float q[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) q[k] = clamp448(__fmul_rn(y[c][k], inv));
    store_u8x8<VEC>(row + chunk_elem<W>(c, lane), pack4_e4m3(q[0], q[1], q[2], q[3]),
                    pack4_e4m3(q[4], q[5], q[6], q[7]));
  }
}

// ----------------------------------------------------------------------------------------- int4
// Grouped asymmetric INT4 (SPEC §2.5). Group size gs = D/G. When gs % 8 == 0 every chunk lies in one
// group (the common case); otherwise the group is looked up per element.
template <int G>
__device__ __forceinline__ void int4_select(int g, const float (&mn)[G], const double (&inv)[G],
                                            const u32 (&bad)[G], float& gmn, double& ginv, u32& gbad) {
  gmn = mn[0]; ginv = inv[0]; gbad = bad[0];
#pragma unroll
  for (int j = 1; j < G; ++j)
    if (g == j) { gmn = mn[j]; ginv = inv[j]; gbad = bad[j]; }
}

__device__ __forceinline__ u32 int4_code(float y, float mn, double inv) {
  const float d = __fsub_rn(y, mn);
  const float v = __double2float_rn(__dmul_rn((double)d, inv));
  return (u32)__float2int_rn(v) & 0xfu;
}

template <int W, int V, int G, bool VEC>
__device__ __forceinline__ void encode_int4_row(const float (&y)[V][8], int D, int lane, u8* row) {
  const int gs = D / G;
  const bool aligned = (gs & 7) == 0;
  float mn[G], mx[G];
  u32 bad[G];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    mn[g] = __int_as_float(0x7f800000);
    mx[g] = -__int_as_float(0x7f800000);
    bad[g] = 0;
  }
#pragma unroll CUKV_UNROLL_V
  for (int c = 0; c < V; ++c) {
    if (!chunk_valid<W>(c, lane, D)) continue;
    const int e = chunk_elem<W>(c, lane);
    const int g0 = G == 1 ? 0 : e / gs;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const int g = (G == 1 || aligned) ? g0 : (e + k) / gs;
      const float v = y[c][k];
#pragma unroll
      for (int j = 0; j < G; ++j)
        if (g == j) {
          bad[j] |= !is_finite(v);
          mn[j] = fminf(mn[j], v);
          mx[j] = fmaxf(mx[j], v);
        }
    }
  }
  double inv[G];
  u32 w[G];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    mn[g] = team_min<W>(mn[g]);
    mx[g] = team_max<W>(mx[g]);
    bad[g] = team_or<W>(bad[g]);
    const float s = __fdiv_rn(__fsub_rn(mx[g], mn[g]), 15.0f);
    inv[g] = __ddiv_rn(15.0, __dadd_rn(__dmul_rn(15.0, (double)s), 1e-8));
    w[g] = bad[g] ? (CUKV_NAN_HALF | (CUKV_NAN_HALF << 16))
                  : ((u32)f32_to_f16(s) | ((u32)f32_to_f16(mn[g]) << 16));
  }
  u8* nib = row + 4 * G;
#pragma unroll CUKV_UNROLL_V
  for (int c = 0; c < V; ++c) {
    if (!chunk_valid<W>(c, lane, D)) continue;
    const int e = chunk_elem<W>(c, lane);
    u32 packed = 0;
    if (aligned) {
      float gmn; double ginv; u32 gbad;
      int4_select<G>(G == 1 ? 0 : e / gs, mn, inv, bad, gmn, ginv, gbad);
#pragma unroll
      for (int k = 0; k < 8; ++k) packed |= (gbad ? 0u : int4_code(y[c][k], gmn, ginv)) << (4 * k);
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        float gmn; double ginv; u32 gbad;
        int4_select<G>((e + k) / gs, mn, inv, bad, gmn, ginv, gbad);
        packed |= (gbad ? 0u : int4_code(y[c][k], gmn, ginv)) << (4 * k);
      }
    }
    store_u32<VEC>(nib + e / 2, packed);
  }
  if (lane == 0) {
#pragma unroll
    for (int g = 0; g < G; ++g) store_u32<VEC>(row + 4 * g, w[g]);
  }
}

// ----------------------------------------------------------------------------------------- dispatch
// Encode y into one row of format FMT. `word`: external fp8 qparam (or null); `inv`: fp8_head RN(1/s).
template <int FMT, int G, int W, int V, bool VEC>
__device__ __forceinline__ void encode_row(const float (&y)[V][8], int D, int lane, u8* row, int* word,
                                           float inv) {
  if (FMT == FMT_BF16) encode_bf16_row<W, V, VEC>(y, D, lane, reinterpret_cast<u16*>(row));
  else if (FMT == FMT_FP8) encode_fp8_row<W, V, VEC>(y, D, lane, row, word);
  else if (FMT == FMT_FP8_HEAD) encode_fp8_head_row<W, V, VEC>(y, D, lane, row, inv);
  else encode_int4_row<W, V, G, VEC>(y, D, lane, row);
}

// Decode one row into fp32 values x whose RN_bf16 is the dequantized bf16 value (SPEC §2.3-§2.5):
//   fp8:      RN_f32(E4M3^-1(q) * scale + shift)   (exact product, one rounding)
//   fp8_head: RN_f32(E4M3^-1(q) * s)
//   int4:     RN_f16(q * scale + shift)            (one fp16 fma), widened exactly
//   bf16:     the stored value
// `word`: external fp8 qparam (null: inline); `s`: fp8_head scale. Chunks past D are left as is.
template <int FMT, int G, int W, int V, bool VEC>
__device__ __forceinline__ void decode_row(const u8* row, const int* word, float s, int D, int lane,
                                           float (&x)[V][8]) {
  if (FMT == FMT_BF16) {
#pragma unroll CUKV_UNROLL_V
    for (int c = 0; c < V; ++c)
      if (chunk_valid<W>(c, lane, D))
        Chunk<bf16_t, VEC>::load(reinterpret_cast<const bf16_t*>(row) + chunk_elem<W>(c, lane), x[c]);
    return;
  }
  if (FMT == FMT_INT4) {
    const int gs = D / G;
    u32 w[G];
#pragma unroll
    for (int g = 0; g < G; ++g) w[g] = load_u32<VEC>(row + 4 * g);
#pragma unroll CUKV_UNROLL_V
    for (int c = 0; c < V; ++c) {
      if (!chunk_valid<W>(c, lane, D)) continue;
      const int e = chunk_elem<W>(c, lane);
      const u32 p = load_u32<VEC>(row + 4 * G + e / 2);
      const int g0 = G == 1 ? 0 : e / gs;
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const int g = (G == 1 || (gs & 7) == 0) ? g0 : (e + k) / gs;
        u32 wg = w[0];
#pragma unroll
        for (int j = 1; j < G; ++j)
          if (g == j) wg = w[j];
        x[c][k] = f16_to_f32(f16_fma(u4_to_f16((p >> (4 * k)) & 0xfu), (u16)(wg & 0xffffu), (u16)(wg >> 16)));
      }
    }
    return;
  }
  float scale = s, shift = 0.0f;
  int off = 0;
  if (FMT == FMT_FP8) {
    const u32 w = word ? (u32)*word : load_u32<VEC>(row);
    scale = f16_to_f32((u16)(w & 0xffffu));
    shift = f16_to_f32((u16)(w >> 16));
    off = word ? 0 : 4;
  }
#pragma unroll CUKV_UNROLL_V
  for (int c = 0; c < V; ++c) {
    if (!chunk_valid<W>(c, lane, D)) continue;
    u32 lo, hi;
    load_u8x8<VEC>(row + off + chunk_elem<W>(c, lane), lo, hi);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const float q = e4m3_to_f32(((k < 4 ? lo : hi) >> (8 * (k & 3))) & 0xffu);
      x[c][k] = FMT == FMT_FP8 ? __fadd_rn(__fmul_rn(q, scale), shift) : __fmul_rn(q, scale);
    }
  }
}
