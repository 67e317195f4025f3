// cukv/cuda_src/common.cuh: device helpers shared by every kernel family.
//
// No CUDA headers are included: NVRTC compiles this file as is, with or without a CUDA toolkit on the
// machine. bf16 / fp16 / e4m3 conversions are written in PTX or integer code; every one rounds to
// nearest even, once, exactly as the NumPy reference (cukv.ref) does.
//
// Rows are processed by a *team* of W lanes (W a power of two <= 32, aligned inside a warp). Each lane
// holds V chunks of 8 consecutive elements: chunk c of lane l covers elements [(c*W + l)*8, +8).
// Team reductions are XOR butterflies, so every lane of the team ends with the whole-row result
// (SPEC §2.6).
#pragma once

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

// Storage tags for 16-bit float inputs (template arguments; the bits are the value).
struct bf16_t { u16 bits; };
struct f16_t { u16 bits; };

#define CUKV_FULL_MASK 0xffffffffu
// Loops over a lane's V chunks are written `#pragma unroll (V <= 4 ? V : 1)`: fully unrolled up to 4
// chunks (rows of up to 1024 elements, every KV head size); longer rows keep the loop, so compile time
// stays bounded and the rare long row still works.
#define CUKV_S_MIN (1.0f / 229376.0f)   // RN_f32(1/229376): the smallest FP8 scale (SPEC §1.1)

// ------------------------------------------------------------------------------------ conversions
__device__ __forceinline__ float bf16_to_f32(u16 b) { return __uint_as_float(((u32)b) << 16); }

__device__ __forceinline__ u16 f32_to_bf16(float f) {
  u16 r;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
  return r;
}

// Two floats -> one word of two bf16: lo in bits 0-15 (the lower address), hi in bits 16-31.
__device__ __forceinline__ u32 pack_bf16x2(float lo, float hi) {
  u32 r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

__device__ __forceinline__ float f16_to_f32(u16 h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}

__device__ __forceinline__ u16 f32_to_f16(float f) {
  u16 r;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f));
  return r;
}

// Two floats -> one word of two fp16 (RN each): lo in bits 0-15, hi in bits 16-31. One F2FP
// instruction, bit-identical to f32_to_f16(lo) | f32_to_f16(hi) << 16.
__device__ __forceinline__ u32 pack_f16x2(float lo, float hi) {
  u32 r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

// RN_f16(a*b + c) with one rounding (an fp16 fma), on fp16 bit patterns.
__device__ __forceinline__ u16 f16_fma(u16 a, u16 b, u16 c) {
  u16 r;
  asm("fma.rn.f16 %0, %1, %2, %3;" : "=h"(r) : "h"(a), "h"(b), "h"(c));
  return r;
}

// Small unsigned integer (0..15) -> fp16 bits, exact: (1024 + q) - 1024 in fp16 (1024 + q is exact,
// the difference is exact), on the fp16 pipe instead of the slower int -> float conversion unit.
__device__ __forceinline__ u16 u4_to_f16(u32 q) {
  u16 r;
  const u16 a = (u16)(0x6400u | q), k = (u16)0x6400u;
  asm("sub.rn.f16 %0, %1, %2;" : "=h"(r) : "h"(a), "h"(k));
  return r;
}

template <typename T> __device__ __forceinline__ float to_f32(T v);
template <> __device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f32<bf16_t>(bf16_t v) { return bf16_to_f32(v.bits); }
template <> __device__ __forceinline__ float to_f32<f16_t>(f16_t v) { return f16_to_f32(v.bits); }

// e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; 0x7F/0xFF NaN; max finite 448 (0x7E).
// Encode fp32 -> e4m3fn, round to nearest even, saturating (|v| >= 448 and +-inf -> +-448), NaN -> 0x7F
// (the convention of CUDA's __nv_fp8_e4m3 converter; SPEC §11.4). Integer-only, any architecture.
__device__ __forceinline__ u32 f32_to_e4m3(float v) {
  const u32 b = __float_as_uint(v);
  const u32 sign = (b >> 24) & 0x80u;
  const u32 a = b & 0x7fffffffu;
  if (a > 0x7f800000u) return 0x7fu;              // NaN
  if (a >= 0x43e00000u) return sign | 0x7eu;      // |v| >= 448 (incl. inf): saturate
  if (a < 0x3c800000u) {                          // |v| < 2^-6: subnormal range, step 2^-9
    // |v| * 2^9 is exact; rint rounds half to even. Result 0..8 (8 = the smallest normal, 0x08).
    const float q = rintf(__uint_as_float(a) * 512.0f);
    return sign | (u32)q;
  }
  // Normal: keep 3 mantissa bits with round-to-nearest-even on the fp32 bit pattern, then rebias
  // the exponent from 127 to 7 (subtract 120 << 3 from the 8+3 bit field).
  const u32 r = (a + 0x7ffffu + ((a >> 20) & 1u)) >> 20;
  const u32 c = r - (120u << 3);
  return sign | (c > 0x7eu ? 0x7eu : c);
}

// Decode e4m3fn -> fp32 (exact). Normal codes rebias the exponent by integer addition; subnormal
// codes (exponent field 0) are m * 2^-9, computed from the integer m, so no fp32 subnormal is involved.
__device__ __forceinline__ float e4m3_to_f32(u32 c) {
  const u32 m = c & 0x7fu;
  const u32 sign = (c & 0x80u) << 24;
  if (m == 0x7fu) return __uint_as_float(sign | 0x7fc00000u);
  // subnormal m * 2^-9 = 2^-6 * (1 + m/8) - 2^-6: an exact subtraction (Sterbenz), no int -> float cvt
  const float v = m >= 8u ? __uint_as_float((m << 20) + (120u << 23))
                          : __fsub_rn(__uint_as_float((m << 20) + (121u << 23)), 0x1p-6f);
  return __uint_as_float(__float_as_uint(v) | sign);
}

// Two floats -> two e4m3fn codes (lo in bits 0-7, hi in bits 8-15), bit-identical to f32_to_e4m3 of
// each: on sm_89+ one hardware cvt (round to nearest even, saturating, NaN -> 0x7F).
__device__ __forceinline__ u32 f32x2_to_e4m3x2(float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  u16 r;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
  return (u32)r;
#else
  return f32_to_e4m3(lo) | (f32_to_e4m3(hi) << 8);
#endif
}

__device__ __forceinline__ bool is_finite(float v) {
  return (__float_as_uint(v) & 0x7f800000u) != 0x7f800000u;
}

// ------------------------------------------------------------------------------------ team reductions
// A team is W consecutive lanes starting at a multiple of W. team_mask() is the shuffle mask of the
// calling lane's team, so a whole team may leave early without stalling the other teams of its warp.
// A kernel that keeps every lane of a warp in the team code (no team leaves early) defines
// CUKV_FULL_WARP_TEAMS before including this file: its shuffles then use the constant full mask, which
// compiles to plain SHFL instead of the WARPSYNC.COLLECTIVE sequences a computed mask needs.
template <int W> __device__ __forceinline__ u32 team_mask() {
#ifdef CUKV_FULL_WARP_TEAMS
  return CUKV_FULL_MASK;
#else
  if (W >= 32) return CUKV_FULL_MASK;
  const u32 base = (threadIdx.x & 31u) & ~(u32)(W - 1);
  return ((1u << W) - 1u) << base;
#endif
}
// Sum: every lane ends with the same value (a+b == b+a in IEEE), summation order fixed by W.
template <int W> __device__ __forceinline__ float team_sum(float v) {
  const u32 m = team_mask<W>();
#pragma unroll
  for (int o = W / 2; o > 0; o >>= 1) v = __fadd_rn(v, __shfl_xor_sync(m, v, o));
  return v;
}
// NaN-propagating min / max (sm_80+): a NaN anywhere in a row reaches the reduced value, so the row
// encoders detect non-finite rows from the reduced min and max alone (an inf shows up there too).
__device__ __forceinline__ float fmin_nan(float a, float b) {
  float r;
  asm("min.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float fmax_nan(float a, float b) {
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
// Min and max over an aligned sub-team of `sw` lanes (a power of two <= W; sw == W: the whole team).
// `sw` is uniform over the team, so every lane runs the same shuffles. NaN propagates.
template <int W> __device__ __forceinline__ void team_minmax_nan(float& mn, float& mx, int sw = W) {
  const u32 m = team_mask<W>();
#pragma unroll
  for (int o = W / 2; o > 0; o >>= 1) {
    if (o < sw) {
      mn = fmin_nan(mn, __shfl_xor_sync(m, mn, o));
      mx = fmax_nan(mx, __shfl_xor_sync(m, mx, o));
    }
  }
}

// ------------------------------------------------------------------------------------ chunk I/O
// Load 8 consecutive elements starting at p (an element pointer) as floats. VEC: 16-byte loads
// (the host checked the alignment); otherwise element loads.
template <typename T, bool VEC> struct Chunk;

template <bool VEC> struct Chunk<bf16_t, VEC> {
  static __device__ __forceinline__ void load(const bf16_t* p, float (&f)[8]) {
    if (VEC) {
      const uint4 u = *reinterpret_cast<const uint4*>(p);
      const u32 w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        f[2 * k] = __uint_as_float(w[k] << 16);
        f[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
      }
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k) f[k] = bf16_to_f32(p[k].bits);
    }
  }
};

template <bool VEC> struct Chunk<f16_t, VEC> {
  static __device__ __forceinline__ void load(const f16_t* p, float (&f)[8]) {
    if (VEC) {
      const uint4 u = *reinterpret_cast<const uint4*>(p);
      const u32 w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        f[2 * k] = f16_to_f32((u16)(w[k] & 0xffffu));
        f[2 * k + 1] = f16_to_f32((u16)(w[k] >> 16));
      }
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k) f[k] = f16_to_f32(p[k].bits);
    }
  }
};

template <bool VEC> struct Chunk<float, VEC> {
  static __device__ __forceinline__ void load(const float* p, float (&f)[8]) {
    if (VEC) {
      const float4 a = reinterpret_cast<const float4*>(p)[0];
      const float4 b = reinterpret_cast<const float4*>(p)[1];
      f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w;
      f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k) f[k] = p[k];
    }
  }
};

// Store 8 floats as bf16 at p (u16 element pointer); VEC: one 16-byte store.
template <bool VEC>
__device__ __forceinline__ void store_bf16x8(u16* p, const float (&f)[8]) {
  if (VEC) {
    uint4 u;
    u.x = pack_bf16x2(f[0], f[1]);
    u.y = pack_bf16x2(f[2], f[3]);
    u.z = pack_bf16x2(f[4], f[5]);
    u.w = pack_bf16x2(f[6], f[7]);
    *reinterpret_cast<uint4*>(p) = u;
  } else {
#pragma unroll
    for (int k = 0; k < 8; ++k) p[k] = f32_to_bf16(f[k]);
  }
}

// Store 8 bytes at p; VEC: two 4-byte stores (p is 4-byte aligned).
template <bool VEC>
__device__ __forceinline__ void store_u8x8(u8* p, u32 lo, u32 hi) {
  if (VEC) {
    reinterpret_cast<u32*>(p)[0] = lo;
    reinterpret_cast<u32*>(p)[1] = hi;
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) { p[k] = (u8)(lo >> (8 * k)); p[4 + k] = (u8)(hi >> (8 * k)); }
  }
}

template <bool VEC>
__device__ __forceinline__ void load_u8x8(const u8* p, u32& lo, u32& hi) {
  if (VEC) {
    lo = reinterpret_cast<const u32*>(p)[0];
    hi = reinterpret_cast<const u32*>(p)[1];
  } else {
    lo = hi = 0;
#pragma unroll
    for (int k = 0; k < 4; ++k) { lo |= (u32)p[k] << (8 * k); hi |= (u32)p[4 + k] << (8 * k); }
  }
}

template <bool VEC>
__device__ __forceinline__ void store_u32(u8* p, u32 v) {
  if (VEC) {
    *reinterpret_cast<u32*>(p) = v;
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) p[k] = (u8)(v >> (8 * k));
  }
}

template <bool VEC>
__device__ __forceinline__ u32 load_u32(const u8* p) {
  if (VEC) return *reinterpret_cast<const u32*>(p);
  u32 v = 0;
#pragma unroll
  for (int k = 0; k < 4; ++k) v |= (u32)p[k] << (8 * k);
  return v;
}
