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

// Fold the 8 values of a chunk into a running NaN-propagating min and max.
__device__ __forceinline__ void chunk_minmax(const float (&y)[8], float& mn, float& mx) {
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    mn = fmin_nan(mn, y[k]);
    mx = fmax_nan(mx, y[k]);
  }
}

// A row or group is non-finite iff its NaN-propagating min or max is not finite.
__device__ __forceinline__ u32 nonfinite(float mn, float mx) { return !(is_finite(mn) && is_finite(mx)); }

// E4M3(clamp(v, +-448)) for 4 values: the encoders saturate |v| >= 448 (and +-inf) to +-448 and map
// NaN to 0x7F, so the clamp of SPEC §2.3/§2.4 needs no instruction of its own.
__device__ __forceinline__ u32 pack4_e4m3(float a, float b, float c, float d) {
  return f32x2_to_e4m3x2(a, b) | (f32x2_to_e4m3x2(c, d) << 16);
}

// ----------------------------------------------------------------------------------------- bf16
template <int W, int V, bool VEC>
__device__ __forceinline__ void encode_bf16_row(const float (&y)[V][8], int D, int lane, u16* row) {
#pragma unroll (V <= 4 ? V : 1)
  for (int c = 0; c < V; ++c)
    if (chunk_valid<W>(c, lane, D)) store_bf16x8<VEC>(row + chunk_elem<W>(c, lane), y[c]);
}

// ----------------------------------------------------------------------------------------- fp8
// Per-row asymmetric FP8 (SPEC §2.3). `word` null: qparams inline at the row front; else external.
template <int W, int V, bool VEC>
__device__ __forceinline__ void encode_fp8_row(const float (&y)[V][8], int D, int lane, u8* row,
                                               int* word) {
  float mn = __int_as_float(0x7f800000), mx = -__int_as_float(0x7f800000);
#pragma unroll (V <= 4 ? V : 1)
  for (int c = 0; c < V; ++c)
    if (chunk_valid<W>(c, lane, D)) chunk_minmax(y[c], mn, mx);
  team_minmax_nan<W>(mn, mx);
  const u32 bad = nonfinite(mn, mx);
  float h = __fmul_rn(__fsub_rn(mx, mn), 0.5f);  // == RN(RN(mx - mn) / 2): halving is exact scaling
  h = h < 32750.0f ? h : 32750.0f;
  float s = __fdiv_rn(h, 448.0f);
  s = s > CUKV_S_MIN ? s : CUKV_S_MIN;
  const float z = __fadd_rn(mn, __fmul_rn(448.0f, s));
  const float inv = __frcp_rn(s);
  const u32 w = bad ? CUKV_NAN_WORD : pack_f16x2(s, z);
  u8* codes = row + (word ? 0 : 4);
#pragma unroll (V <= 4 ? V : 1)
  for (int c = 0; c < V; ++c) {
    if (!chunk_valid<W>(c, lane, D)) continue;
    float q[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) q[k] = __fmul_rn(__fsub_rn(y[c][k], z), inv);  // encoder saturates
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
#pragma unroll (V <= 4 ? V : 1)
  for (int c = 0; c < V; ++c) {
    if (!chunk_valid<W>(c, lane, D)) continue;
    float q[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) q[k] = __fmul_rn(y[c][k], inv);  // encoder clamps to +-448, keeps NaN
    store_u8x8<VEC>(row + chunk_elem<W>(c, lane), pack4_e4m3(q[0], q[1], q[2], q[3]),
                    pack4_e4m3(q[4], q[5], q[6], q[7]));
  }
}

// ----------------------------------------------------------------------------------------- int4
// Grouped asymmetric INT4 (SPEC §2.5). Group size gs = D/G. When gs % 8 == 0 every chunk lies in one
// group (the common case); otherwise the group is looked up per element.
// q = round_half_even(RN_f32(RN_f64(f64(RN_f32(y - mn)) * inv))) & 0xF with
// inv = RN_f64(15 / RN_f64(RN_f64(15 * s) + 1e-8)) (SPEC §2.5).
//
// Fast path, in fp32: inv32 = RN(15 * RN(1 / RN(15 s + 1e-8f))) is within 2^-22 (relative) of the
// spec's float64 inv (three fp32 roundings; 1e-8f is 1e-8 within 2^-24), so with d <= ~15 s the exact
// product d * inv32 lies within 15 * 2^-22 < 2^-18 of d * inv, v = RN_f32(RN_f64(d * inv)) within
// 2^-21 + 2^-52 more, and e below within 2^-26 more. Where p is farther than 2^-16 from every half-integer, rint(p) == rint(v);
// within 2^-16 of one (about 2^-15 of the elements), or for NaN, int4_redo8 runs the spec's float64
// formula. Rounding to an integer uses the 1.5 * 2^23 magic addition (round half to even).
#define CUKV_INT4_TIE (0.5f - 0x1p-16f)
struct Int4Group {
  float mn, s, inv32;
};

__device__ __forceinline__ Int4Group int4_group(float mn, float mx) {
  Int4Group g;
  g.mn = mn;
  g.s = __fdiv_rn(__fsub_rn(mx, mn), 15.0f);
  g.inv32 = __fmul_rn(15.0f, __frcp_rn(__fmaf_rn(15.0f, g.s, 1e-8f)));
  return g;
}

// The spec's float64 path: inv = RN_f64(15 / RN_f64(RN_f64(15 s) + 1e-8)), q = rint(RN_f32(RN_f64(d inv))).
__device__ __forceinline__ double int4_inv64(float s) {
  return __ddiv_rn(15.0, __dadd_rn(__dmul_rn(15.0, (double)s), 1e-8));
}
__device__ __forceinline__ u32 int4_code64(float d, double inv) {
  return (u32)__float2int_rn(__double2float_rn(__dmul_rn((double)d, inv))) & 0xfu;
}

// The exact redo of a chunk with an element near a half-integer (or NaN): every such element gets
// the float64 formula. Out of line, with the chunk passed by value, so its float64 registers do not
// raise the register count (and lower the occupancy) of the fast path, and no array goes to local
// memory.
__device__ __noinline__ u32 int4_redo8(u32 packed, float inv32, float s, float d0, float d1, float d2,
                                      float d3, float d4, float d5, float d6, float d7) {
  const float M = 12582912.0f;
  const float d[8] = {d0, d1, d2, d3, d4, d5, d6, d7};
  const double inv = int4_inv64(s);       // one float64 division for the chunk
#pragma unroll
  for (int k = 0; k < 8; ++k) {           // unrolled: a run-time index into d would move it to local memory
    const float t = __fmaf_rn(d[k], inv32, M);
    const float e = __fmaf_rn(d[k], inv32, -__fsub_rn(t, M));
    if (!(fabsf(e) < CUKV_INT4_TIE))
      packed = (packed & ~(0xfu << (4 * k))) | (int4_code64(d[k], inv) << (4 * k));
  }
  return packed;
}

// Eight codes of one chunk, packed (element k in bits 4k..4k+3). t = RN(d * inv32 + 1.5 * 2^23) holds
// rint(d * inv32) in its low mantissa bits, so the nibbles are sum_k bits(t_k) * 16^k (mod 2^32) minus
// the constant sum_k bits(1.5 * 2^23) * 16^k; e = RN(d * inv32 - rint) measures the distance to the
// nearest integer, and a chunk with any |e| near 1/2 (or NaN) is redone with the exact formula.
__device__ __forceinline__ u32 int4_codes8(const float (&y)[8], const Int4Group& g) {
  const float M = 12582912.0f;
  u32 packed = 0;
  float emax = 0.0f;
  float d[8];
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    d[k] = __fsub_rn(y[k], g.mn);
    const float t = __fmaf_rn(d[k], g.inv32, M);
    const float e = __fmaf_rn(d[k], g.inv32, -__fsub_rn(t, M));
    emax = fmax_nan(emax, fabsf(e));
    packed += __float_as_uint(t) << (4 * k);
  }
  packed -= 0x4B400000u * 0x11111111u;   // the magic's bits in every nibble position (mod 2^32)
  if (!(emax < CUKV_INT4_TIE))         // rare: some element near a half-integer, or NaN
    packed = int4_redo8(packed, g.inv32, g.s, d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]);
  return packed;
}

// One code (the general path, groups not aligned to chunks): the same fast path and fallback.
__device__ __forceinline__ u32 int4_code1(float y, const Int4Group& g) {
  const float d = __fsub_rn(y, g.mn);
  const float p = __fmul_rn(d, g.inv32);
  const float t = __fadd_rn(p, 12582912.0f);
  const float dist = fabsf(__fsub_rn(p, __fsub_rn(t, 12582912.0f)));
  return dist < CUKV_INT4_TIE ? (__float_as_uint(t) & 0xfu) : int4_code64(d, int4_inv64(g.s));
}

// The group word: scale and shift halves. A zero minimum is stored as +0 (mn + 0: -0 -> +0), whatever
// zero the min reduction met first, so the bytes do not depend on the reduction order (codes do not
// depend on the sign: y - (+-0) rounds to the same code).
__device__ __forceinline__ u32 int4_word(float s, float mn, u32 bad) {
  return bad ? (CUKV_NAN_HALF | (CUKV_NAN_HALF << 16)) : pack_f16x2(s, __fadd_rn(mn, 0.0f));
}

// Fast path: every group is gs/8 = sw consecutive chunks held by an aligned sub-team of sw lanes
// (sw a power of two <= W). Each lane reduces its chunk, the sub-team combines, and each lane encodes
// with its own group's parameters; the first lane of each group writes the group's word.
template <int W, int V, bool VEC>
__device__ __forceinline__ void encode_int4_row_subteam(const float (&y)[V][8], int D, int lane, u8* row,
                                                        int G, int sw) {
  u8* nib = row + 4 * G;
#pragma unroll (V <= 4 ? V : 1)
  for (int c = 0; c < V; ++c) {
    const bool valid = chunk_valid<W>(c, lane, D);
    float mn = __int_as_float(0x7f800000), mx = -__int_as_float(0x7f800000);
    if (valid) chunk_minmax(y[c], mn, mx);
    team_minmax_nan<W>(mn, mx, sw);
    const u32 bad = nonfinite(mn, mx);
    if (!valid) continue;
    const Int4Group g = int4_group(mn, mx);
    const int e = chunk_elem<W>(c, lane);
    store_u32<VEC>(nib + e / 2, bad ? 0u : int4_codes8(y[c], g));
    if ((lane & (sw - 1)) == 0)   // sw is a power of two: the group index is a shift
      store_u32<VEC>(row + 4 * ((c * W + lane) >> (__ffs(sw) - 1)), int4_word(g.s, mn, bad));
  }
}

// General path: any group layout (G == 1: the whole row; G > 1: groups not made of aligned sub-teams).
// For G > 1 it is the rare path and stays out of line, so its per-group arrays do not raise the
// register count (and lower the occupancy) of the common sub-team path.
template <int W, int V, int G, bool VEC>
__device__ __forceinline__ void encode_int4_row_general(const float (&y)[V][8], int D, int lane, u8* row) {
  const int gs = D / G;
  const bool aligned = (gs & 7) == 0;
  float mn[G], mx[G];
  u32 bad[G];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    mn[g] = __int_as_float(0x7f800000);
    mx[g] = -__int_as_float(0x7f800000);
  }
#pragma unroll (V <= 4 ? V : 1)
  for (int c = 0; c < V; ++c) {
    if (!chunk_valid<W>(c, lane, D)) continue;
    const int e = chunk_elem<W>(c, lane);
    if (G == 1) {
      chunk_minmax(y[c], mn[0], mx[0]);
      continue;
    }
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const int g = (aligned ? e : e + k) / gs;
      const float v = y[c][k];
#pragma unroll
      for (int j = 0; j < G; ++j)
        if (g == j) {
          mn[j] = fmin_nan(mn[j], v);
          mx[j] = fmax_nan(mx[j], v);
        }
    }
  }
  Int4Group grp[G];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    team_minmax_nan<W>(mn[g], mx[g]);
    bad[g] = nonfinite(mn[g], mx[g]);
    grp[g] = int4_group(mn[g], mx[g]);
  }
  u8* nib = row + 4 * G;
#pragma unroll (V <= 4 ? V : 1)
  for (int c = 0; c < V; ++c) {
    if (!chunk_valid<W>(c, lane, D)) continue;
    const int e = chunk_elem<W>(c, lane);
    u32 packed = 0;
    if (G == 1 || aligned) {
      const int g0 = G == 1 ? 0 : e / gs;
      Int4Group sel = grp[0];
      u32 sbad = bad[0];
#pragma unroll
      for (int j = 1; j < G; ++j)
        if (g0 == j) { sel = grp[j]; sbad = bad[j]; }
      packed = sbad ? 0u : int4_codes8(y[c], sel);
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const int gk = (e + k) / gs;
        Int4Group sel = grp[0];
        u32 sbad = bad[0];
#pragma unroll
        for (int j = 1; j < G; ++j)
          if (gk == j) { sel = grp[j]; sbad = bad[j]; }
        packed |= (sbad ? 0u : int4_code1(y[c][k], sel)) << (4 * k);
      }
    }
    store_u32<VEC>(nib + e / 2, packed);
  }
  if (lane == 0) {
#pragma unroll
    for (int g = 0; g < G; ++g) store_u32<VEC>(row + 4 * g, int4_word(grp[g].s, mn[g], bad[g]));
  }
}

template <int W, int V, int G, bool VEC>
__device__ __noinline__ void encode_int4_row_general_call(const float (&y)[V][8], int D, int lane, u8* row) {
  encode_int4_row_general<W, V, G, VEC>(y, D, lane, row);
}

template <int W, int V, int G, bool VEC>
__device__ __forceinline__ void encode_int4_row(const float (&y)[V][8], int D, int lane, u8* row) {
  if (G == 1) {
    encode_int4_row_general<W, V, 1, VEC>(y, D, lane, row);
    return;
  }
  const int gs = D / G;
  const int sw = gs >> 3;
  if ((gs & 7) == 0 && sw <= W && (sw & (sw - 1)) == 0) encode_int4_row_subteam<W, V, VEC>(y, D, lane, row, G, sw);
  else encode_int4_row_general_call<W, V, G, VEC>(y, D, lane, row);
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
#pragma unroll (V <= 4 ? V : 1)
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
#pragma unroll (V <= 4 ? V : 1)
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
#pragma unroll (V <= 4 ? V : 1)
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
