// cukv/cuda_src/cache_write.cu: fused KV-cache writes, cukv.write_kv_prefill / write_kv_decode (SPEC §4, §5).
//
// write_kv<FMT, G, W>: one block per token (blockIdx.x) and a slice of its rows (blockIdx.y); the
// rows of token i are its Q heads, then its K heads, then its V heads (the amax column order), each
// handled by a team of W = D/8 lanes holding 8 consecutive elements (common.cuh, V = 1). Per row:
//   Q/K: bf16 -> fp32, position encoding in float64 (RoPE / xPos, one rounding per operation, then
//        RN_f32), qk_norm in fp32 (team sum), then
//        Q: xq_out = RN_bf16(y) (+ write-back into xq), fp8_head: amax[b, h] |= max|y|;
//        K: write-back into xk, then encode like V;
//   V:   y = f32(x); encode y into the cache row (b, c, h) with rows.cuh (FMT: bf16 / fp8 inline or
//        external word / fp8_head with scale qparam[b, h] / int4:gG). fp8_head rows whose lane has no
//        scale yet (not precomputed) only update amax and write no cache row.
// A skipped token (i >= valid_tokens, position -1, cache slot -1, or any index out of range) writes
// zeros into its xq_out rows and nothing else.
//
// The float64 cos/sin (and xPos zeta^e) of the token's position are computed once per (token, pair)
// into shared memory by the block, while the rows' first loads are in flight; every row of the token
// reuses them. The frequency and zeta tables come from the host (cukv/rope.py). Caches are addressed
// with 64-bit offsets: contiguous row (b*capacity + c)*N_KVH + h, paged (page_id*S + c%S)*N_KVH + h.
// Inputs are rows with unit element stride at arbitrary (token, head) strides; `flags` says whether
// 16-byte accesses are allowed for them (CW_VEC_IN) and 4/16-byte ones for the cache (CW_VEC_CACHE).
#include "rows.cuh"

#define CW_INTERLEAVED 1
#define CW_QK_NORM 2
#define CW_Q_BACK 4
#define CW_K_BACK 8
#define CW_VEC_IN 16
#define CW_VEC_CACHE 32
#define CW_ALL_PRE 64

#define CW_BLOCK 256
#define CW_NPF 4            // rows a lane loads ahead
#define CW_MAX_HALF 128     // D/2 for D = 256

// Every lane of the team ends with the integer max.
template <int W> __device__ __forceinline__ int team_max_int(int v) {
  const u32 m = team_mask<W>();
#pragma unroll
  for (int o = W / 2; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(m, v, o));
  return v;
}

// 8 bf16 (16 bytes) at p as raw words; vec: one 16-byte load.
__device__ __forceinline__ uint4 load_raw8(const u16* p, bool vec) {
  if (vec) return *reinterpret_cast<const uint4*>(p);
  uint4 u;
  u.x = (u32)p[0] | ((u32)p[1] << 16);
  u.y = (u32)p[2] | ((u32)p[3] << 16);
  u.z = (u32)p[4] | ((u32)p[5] << 16);
  u.w = (u32)p[6] | ((u32)p[7] << 16);
  return u;
}

__device__ __forceinline__ void unpack_bf16x8(const uint4& u, float (&f)[8]) {
  const u32 w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    f[2 * k] = __uint_as_float(w[k] << 16);
    f[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
  }
}

__device__ __forceinline__ void store_bf16x8_rt(u16* p, const float (&f)[8], bool vec) {
  if (vec) store_bf16x8<true>(p, f);
  else store_bf16x8<false>(p, f);
}

// Rotate (and xPos-scale) the lane's 8 elements starting at element e0 (SPEC §4.3-§4.4).
template <int W>
__device__ __forceinline__ void rotate8(float (&y)[8], int e0, bool interleaved, bool xpos,
                                        const double* cs, const double* sn, const double* z) {
  constexpr int D = 8 * W, H = D / 2;
  if (interleaved) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int p = e0 / 2 + k;
      const double c = cs[p], s = sn[p];
      const double xi = (double)y[2 * k], xj = (double)y[2 * k + 1];
      double yi = __dsub_rn(__dmul_rn(xi, c), __dmul_rn(xj, s));
      double yj = __dadd_rn(__dmul_rn(xj, c), __dmul_rn(xi, s));
      if (xpos) {
        yi = __dmul_rn(yi, z[p]);
        yj = __dmul_rn(yj, z[p]);
      }
      y[2 * k] = __double2float_rn(yi);
      y[2 * k + 1] = __double2float_rn(yj);
    }
  } else {
    // Pair (p, p + D/2): the partner element sits in lane ^ W/2 at the same offset.
    const u32 m = team_mask<W>();
    float o[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) o[k] = __shfl_xor_sync(m, y[k], W / 2);
    const bool first = e0 < H;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const int p = (e0 % H) + k;
      const double c = cs[p], s = sn[p];
      const double xa = __dmul_rn((double)y[k], c), xb = __dmul_rn((double)o[k], s);
      double v = first ? __dsub_rn(xa, xb) : __dadd_rn(xa, xb);
      if (xpos) v = __dmul_rn(v, z[p]);
      y[k] = __double2float_rn(v);
    }
  }
}

// qk_norm (SPEC §4.5): ms = RN(sum y^2 / D) (fp32 team sum), r = RN(1 / RN(sqrt(RN(ms + eps)))).
template <int W>
__device__ __forceinline__ void qk_norm8(float (&y)[8], float eps) {
  float ss = 0.0f;
#pragma unroll
  for (int k = 0; k < 8; ++k) ss = __fadd_rn(ss, __fmul_rn(y[k], y[k]));
  ss = team_sum<W>(ss);
  const float ms = __fdiv_rn(ss, (float)(8 * W));
  const float r = __frcp_rn(__fsqrt_rn(__fadd_rn(ms, eps)));
#pragma unroll
  for (int k = 0; k < 8; ++k) y[k] = __fmul_rn(y[k], r);
}

// amax[col] = max(amax[col], max_d |y_d|) as an integer max on the float bits (SPEC §5.3, §11.4):
// |y| bits are non-negative ints, NaN > +Inf > finite; a stored -0.0 (INT_MIN) loses to anything.
template <int W>
__device__ __forceinline__ void amax_row(int* a, const float (&y)[8], int lane) {
  int v = 0;
#pragma unroll
  for (int k = 0; k < 8; ++k) v = max(v, (int)(__float_as_uint(y[k]) & 0x7fffffffu));
  v = team_max_int<W>(v);
  if (lane == 0) atomicMax(a, v);
}

template <int FMT, int G, int W>
__global__ void __launch_bounds__(CW_BLOCK) write_kv(
    u16* __restrict__ xq, i64 xq_t, i64 xq_h,
    u16* __restrict__ xk, i64 xk_t, i64 xk_h,
    const u16* __restrict__ xv, i64 xv_t, i64 xv_h,
    u16* __restrict__ out,
    u8* __restrict__ cache_k, u8* __restrict__ cache_v, int* __restrict__ qw_k, int* __restrict__ qw_v,
    const float* __restrict__ hs_k, const float* __restrict__ hs_v, int* __restrict__ amax,
    const int* __restrict__ lanes, const int* __restrict__ pos, const int* __restrict__ cpos,
    const int* __restrict__ btab, const u8* __restrict__ pre,
    const void* __restrict__ vt_ptr, int vt_kind, i64 vt_host,
    const double* __restrict__ freqs, const double* __restrict__ zeta, double xoff, double xbase,
    int n_h, int n_kvh, int B, int capacity, int max_pages, int S, int n_pages, i64 row_bytes,
    int amax_cols, float eps, int mode, int flags) {
  constexpr int D = 8 * W, H = D / 2;
  __shared__ double s_cos[CW_MAX_HALF], s_sin[CW_MAX_HALF], s_zq[CW_MAX_HALF], s_zk[CW_MAX_HALF];

  const int i = blockIdx.x;
  const int team = threadIdx.x / W, lane = threadIdx.x % W;
  const int teams = blockDim.x / W;
  const int e0 = lane * 8;
  const bool q_only = xk == nullptr;
  const bool vin = flags & CW_VEC_IN;

  // ---- the token: kept or skipped (SPEC §5.2); block-uniform
  i64 vt = vt_host;
  if (vt_kind == 1) vt = *reinterpret_cast<const int*>(vt_ptr);
  else if (vt_kind == 2) vt = *reinterpret_cast<const long long*>(vt_ptr);
  const int p = pos[i];
  const int c = cpos ? cpos[i] : p;
  const int b = lanes ? lanes[i] : i;
  bool keep = (i64)i < vt && p >= 0 && c >= 0;
  if (B >= 0) keep = keep && b >= 0 && b < B;
  i64 slot = 0;
  if (keep && !q_only) {
    if (c >= capacity) {
      keep = false;
    } else if (btab) {
      const int pid = btab[(i64)b * max_pages + c / S];
      if (pid < 0 || pid >= n_pages) keep = false;
      else slot = (i64)pid * S + c % S;
    } else {
      slot = (i64)b * capacity + c;
    }
  }

  const int rows = q_only ? n_h : n_h + 2 * n_kvh;
  const int r0 = blockIdx.y * teams + team;
  const int rstep = gridDim.y * teams;
  if (!keep) {
    const float zero[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int r = r0; r < n_h; r += rstep) store_bf16x8_rt(out + ((i64)i * n_h + r) * D + e0, zero, vin);
    return;
  }

  // ---- first loads in flight, then the position tables
  auto row_ptr = [&](int r) -> const u16* {
    if (r < n_h) return xq + (i64)i * xq_t + (i64)r * xq_h;
    if (r < n_h + n_kvh) return xk + (i64)i * xk_t + (i64)(r - n_h) * xk_h;
    return xv + (i64)i * xv_t + (i64)(r - n_h - n_kvh) * xv_h;
  };
  uint4 raw[CW_NPF];
#pragma unroll
  for (int k = 0; k < CW_NPF; ++k) {
    const int r = r0 + k * rstep;
    if (r < rows) raw[k] = load_raw8(row_ptr(r) + e0, vin);
  }
  if (mode) {
    for (int pp = threadIdx.x; pp < H; pp += blockDim.x) {
      const double a = __dmul_rn((double)p, freqs[pp]);
      double sn, cs;
      sincos(a, &sn, &cs);
      s_cos[pp] = cs;
      s_sin[pp] = sn;
      if (mode == 2) {
        const double e = __ddiv_rn(__dsub_rn((double)p, xoff), xbase);
        s_zq[pp] = pow(zeta[pp], e);
        s_zk[pp] = pow(zeta[pp], -e);   // (pos - off) / (-scale_base) == -e exactly
      }
    }
    __syncthreads();
  }

  const bool inter = flags & CW_INTERLEAVED, norm = flags & CW_QK_NORM;
  const bool vcache = flags & CW_VEC_CACHE;
  bool precomputed = true;
  if (FMT == FMT_FP8_HEAD) precomputed = (flags & CW_ALL_PRE) || (pre && pre[i]);

  for (int base = r0; base < rows; base += CW_NPF * rstep) {
    if (base != r0) {
#pragma unroll
      for (int k = 0; k < CW_NPF; ++k) {
        const int r = base + k * rstep;
        if (r < rows) raw[k] = load_raw8(row_ptr(r) + e0, vin);
      }
    }
    // Not unrolled (one copy of the row code keeps compile time down); raw[k] is picked by selects
    // so the prefetched rows stay in registers.
#pragma unroll 1
    for (int k = 0; k < CW_NPF; ++k) {
      const int r = base + k * rstep;
      if (r >= rows) break;
      uint4 u = raw[0];
#pragma unroll
      for (int j = 1; j < CW_NPF; ++j)
        if (k == j) u = raw[j];
      float y[1][8];
      unpack_bf16x8(u, y[0]);
      const int kind = r < n_h ? 0 : (r < n_h + n_kvh ? 1 : 2);
      if (kind != 2) {
        if (mode) rotate8<W>(y[0], e0, inter, mode == 2, s_cos, s_sin, kind == 0 ? s_zq : s_zk);
        if (norm) qk_norm8<W>(y[0], eps);
      }
      if (kind == 0) {
        store_bf16x8_rt(out + ((i64)i * n_h + r) * D + e0, y[0], vin);
        if (flags & CW_Q_BACK) store_bf16x8_rt(xq + (i64)i * xq_t + (i64)r * xq_h + e0, y[0], vin);
        if (FMT == FMT_FP8_HEAD && amax) amax_row<W>(amax + (i64)b * amax_cols + r, y[0], lane);
        continue;
      }
      const int h = kind == 1 ? r - n_h : r - n_h - n_kvh;
      if (kind == 1 && (flags & CW_K_BACK))
        store_bf16x8_rt(xk + (i64)i * xk_t + (i64)h * xk_h + e0, y[0], vin);
      float inv = 0.0f;
      if (FMT == FMT_FP8_HEAD) {
        if (!precomputed) {
          if (amax) amax_row<W>(amax + (i64)b * amax_cols + r, y[0], lane);
          continue;
        }
        inv = __frcp_rn((kind == 1 ? hs_k : hs_v)[(i64)b * n_kvh + h]);
      }
      const i64 row = slot * n_kvh + h;
      u8* dst = (kind == 1 ? cache_k : cache_v) + row * row_bytes;
      int* qw = kind == 1 ? qw_k : qw_v;
      int* word = qw ? qw + row : nullptr;
      if (vcache) encode_row<FMT, G, W, 1, true>(y, D, lane, dst, word, inv);
      else encode_row<FMT, G, W, 1, false>(y, D, lane, dst, word, inv);
    }
  }
}
