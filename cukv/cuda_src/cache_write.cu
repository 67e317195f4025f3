// cukv/cuda_src/cache_write.cu: fused KV-cache writes, cukv.write_kv_prefill / write_kv_decode (SPEC §4, §5).
//
// write_kv<FMT, G, W, NORM, PATH>: NORM = qk_norm, a template parameter so that each variant gets its
// own register budget (CW_MINB / CW_MINB_NORM); PATH 1 / 2 compile the common layout straight (see
// the kernel). Blocks walk the tokens (token i, i + gridDim.x, ...; the host sizes the grid to
// one wave of resident blocks) and blockIdx.y selects a slice of each token's rows. The rows of token i
// are its Q heads, then its K heads, then its V heads (the amax column order), each handled by a team
// of W = D/8 lanes holding 8 consecutive elements (common.cuh, V = 1). Per row:
//   Q/K: bf16 -> fp32, position encoding in float64 (RoPE / xPos, one rounding per operation, then
//        RN_f32), qk_norm (sum of squares in float64: of the float64 position-encoded values before
//        their RN_f32, or of the fp32 values without a position encoding; the rest in fp32), then
//        Q: xq_out = RN_bf16(y) (+ write-back into xq), fp8_head: amax[b, h] = max(., max|y|);
//        K: write-back into xk, then encode like V;
//   V:   y = f32(x); encode y into the cache row (b, c, h) with rows.cuh (FMT: bf16 / fp8 inline or
//        external word / fp8_head with scale qparam[b, h] / int4:gG). fp8_head rows whose lane has no
//        scale yet (not precomputed) only update amax and write no cache row.
// A skipped token (i >= valid_tokens, position -1, cache slot -1, or any index out of range) writes
// zeros into its xq_out rows and nothing else.
//
// Schedule: one wave of resident blocks; block x takes tokens x, x + gridDim.x, ... in chunks of `ch`.
// Per chunk, threads 0..ch-1 resolve the chunk's tokens (lane, slot, page, skip) into shared memory and
// the block computes their float64 cos/sin (and xPos zeta^e), once per (token, pair); then the block
// runs through the chunk's tokens with no barrier. Each thread streams its own 16-byte chunks of the
// coming tokens' rows into a private shared-memory ring with cp.async (`stages` tokens deep, `npf`
// rows per team; a thread reads only what it copied, so the ring needs no barrier). Without 16-byte
// alignment (or when the ring does not fit) rows are loaded directly instead. The frequency / zeta
// tables come from the host (cukv/rope.py).
// Caches are addressed with 64-bit offsets: contiguous row (b*capacity + c)*N_KVH + h, paged
// (page_id*S + c%S)*N_KVH + h. Inputs are rows with unit element stride at arbitrary (token, head)
// strides; `flags` says whether 16-byte accesses are allowed for them (CW_VEC_IN) and 4/16-byte ones
// for the cache (CW_VEC_CACHE).
#include "mma.cuh"   // cp_async_commit / cp_async_wait
#include "rows.cuh"

#define CW_INTERLEAVED 1
#define CW_QK_NORM 2
#define CW_Q_BACK 4
#define CW_K_BACK 8
#define CW_VEC_IN 16
#define CW_VEC_CACHE 32
#define CW_ALL_PRE 64
#define CW_ASYNC 128        // rows come through the cp.async ring (16-byte aligned inputs)
#define CW_OFF32 256        // every xq/xk/xv/out element offset fits in int32 (non-negative strides)

#ifndef CW_BLOCK
#define CW_BLOCK 256        // threads per block (cukv/cache_write.py launches with the same)
#endif
// __launch_bounds__ min blocks per SM, per instantiation (H100 sweep, scripts/bench_write.py rows):
// without qk_norm 3 (<= 80 registers: 86.8-89.5% of copy, against 85.4-85.9% at 4); with qk_norm 4
// (<= 64 registers: 77-83%, against 72.8-79.1% at 3).
#ifndef CW_MINB
#define CW_MINB 3
#endif
#ifndef CW_MINB_NORM
#define CW_MINB_NORM 4
#endif
#define CW_MAX_HALF 128     // D/2 for D = 256
#define CW_TAB 2048         // doubles of position tables per block (16 KiB): ch * D/2 * (2 or 4)
#define CW_CH_MAX 32        // tokens per chunk
#define CW_STAGES 2         // tokens in flight per thread in the cp.async ring (cache_write.py _STAGES)

// Table position of pair p (SPEC §4.3) inside each [H] table of a token. Interleaved pairs are stored
// so that lane l's pairs 4l..4l+3 sit at [2l, 2l+1] and [H/2 + 2l, H/2 + 2l + 1]: two 16-byte loads
// per table whose addresses are consecutive across the team's lanes (no shared-memory bank
// conflicts). Half-split pairs keep the natural order.
template <int H>
__device__ __forceinline__ int tab_pos(int p, bool interleaved) {
  return interleaved ? ((p & 3) >> 1) * (H / 2) + (p >> 2) * 2 + (p & 1) : p;
}

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

// 16 bytes global -> shared (32-bit shared-window address sa) without registers (sm_80+); complete
// after cp_async_wait.
__device__ __forceinline__ void cp_async16_sa(u32 sa, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(sa), "l"(gmem) : "memory");
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

#ifndef CW_SS_UNROUNDED
#define CW_SS_UNROUNDED 1   // qk_norm after RoPE / xPos: sum the squares of the unrounded float64 results
#endif

#ifndef CW_STREAM
#define CW_STREAM 0         // 1: xq_out stored with st.global.cs (evict-first)
#endif
// xq_out rows: written once, never read by this kernel.
__device__ __forceinline__ void store_out8(u16* p, const float (&f)[8], bool vec) {
#if CW_STREAM
  if (vec) {
    asm volatile("st.global.cs.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(pack_bf16x2(f[0], f[1])),
                 "r"(pack_bf16x2(f[2], f[3])), "r"(pack_bf16x2(f[4], f[5])), "r"(pack_bf16x2(f[6], f[7]))
                 : "memory");
    return;
  }
#endif
  store_bf16x8_rt(p, f, vec);
}

// The lane's 8 inputs as float64. (Tried on the H100: building the float64 values from the bf16 bits
// with integer moves, against cos/sin tables scaled by 2^896, with an Inf/NaN fallback. It removes a
// conversion per element but adds ~4 integer instructions, and this kernel is issue-bound: 73.6%
// against 77.9% of copy for fp8 + qk_norm.)
__device__ __forceinline__ void inputs_f64(double (&x)[8], const float (&y)[8]) {
#pragma unroll
  for (int k = 0; k < 8; ++k) x[k] = (double)y[k];
}

// Rotate (and xPos-scale) the lane's 8 elements starting at element e0 (SPEC §4.3-§4.4); u holds
// them as bf16 words, y as fp32 (the half-split partner rows are exchanged as words: 4 shuffles).
// SS: also return in ss the lane's sum of the squared float64 results before their RN_f32 (qk_norm).
template <int W, bool SS>
__device__ __forceinline__ void rotate8(float (&y)[8], const uint4& u, int e0, bool interleaved, bool xpos,
                                        const double* cs, const double* sn, const double* z, double& ss) {
  constexpr int D = 8 * W, H = D / 2;
  double s0 = 0.0, s1 = 0.0;   // two chains: the float64 sum order is free (SPEC §4.5)
  if (interleaved) {
    double x[8];
    inputs_f64(x, y);
    // Pairs e0/2 + k, k = 0..3, at tab_pos: [2l, 2l+1] and [H/2 + 2l, H/2 + 2l + 1] with l = e0/8.
    const int l2 = e0 / 4;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int o = h * (H / 2) + l2;
      const double2 c2 = *reinterpret_cast<const double2*>(cs + o);
      const double2 s2 = *reinterpret_cast<const double2*>(sn + o);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int k = 2 * h + j;
        const double c = j ? c2.y : c2.x, s = j ? s2.y : s2.x;
        const double xi = x[2 * k], xj = x[2 * k + 1];
        double yi = __dsub_rn(__dmul_rn(xi, c), __dmul_rn(xj, s));
        double yj = __dadd_rn(__dmul_rn(xj, c), __dmul_rn(xi, s));
        if (xpos) {
          const double zp = z[o + j];
          yi = __dmul_rn(yi, zp);
          yj = __dmul_rn(yj, zp);
        }
        if (SS) {
          s0 = __fma_rn(yi, yi, s0);   // RN(yi^2 + s0): one rounding, as an add of the squares
          s1 = __fma_rn(yj, yj, s1);
        }
        y[2 * k] = __double2float_rn(yi);
        y[2 * k + 1] = __double2float_rn(yj);
      }
    }
  } else {
    // Pair (p, p + D/2): the partner element sits in lane ^ W/2 at the same offset.
    const u32 m = team_mask<W>();
    uint4 ou;
    ou.x = __shfl_xor_sync(m, u.x, W / 2);
    ou.y = __shfl_xor_sync(m, u.y, W / 2);
    ou.z = __shfl_xor_sync(m, u.z, W / 2);
    ou.w = __shfl_xor_sync(m, u.w, W / 2);
    float of[8];
    unpack_bf16x8(ou, of);
    double x[8], xo[8];
    inputs_f64(x, y);
    inputs_f64(xo, of);
    const bool first = e0 < H;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const int p = (e0 % H) + k;
      const double c = cs[p], s = sn[p];
      const double xa = __dmul_rn(x[k], c), xb = __dmul_rn(xo[k], s);
      double v = first ? __dsub_rn(xa, xb) : __dadd_rn(xa, xb);
      if (xpos) v = __dmul_rn(v, z[p]);
      if (SS) {
        if (k & 1) s1 = __fma_rn(v, v, s1);
        else s0 = __fma_rn(v, v, s0);
      }
      y[k] = __double2float_rn(v);
    }
  }
  if (SS) ss = __dadd_rn(s0, s1);
}

// Sum over the team in float64; every lane ends with the same value.
template <int W> __device__ __forceinline__ double team_sum_f64(double v) {
  const u32 m = team_mask<W>();
#pragma unroll
  for (int o = W / 2; o > 0; o >>= 1) v = __dadd_rn(v, __shfl_xor_sync(m, v, o));
  return v;
}

#ifndef CW_FAST_RSQRT
#define CW_FAST_RSQRT 1
#endif
// RN_f32(1 / RN_f32(sqrt(x))) for x >= 0 (or NaN). For x in [2^-101, FLT_MAX] this is the fast path
// that the compiler itself emits for sqrt.rn.f32 (MUFU.RSQ, then one Newton step with the residual
// x - s*s in an fma) followed by its fast path for rcp.rn.f32 (MUFU.RCP, one Newton step): both are
// correctly rounded there (sqrt.rn takes it for exactly these x, rcp.rn for every normal input below
// 2^126, and sqrt(x) lies in [2^-50.5, 2^64]). One range test replaces the two of
// __frcp_rn(__fsqrt_rn(x)), which runs for the other x (0, subnormals, Inf, NaN). H100, qk_norm rows
// of scripts/bench_write.py, same-run A/B: +0.7 to +1.8 points of copy bandwidth (fp8 84.5/83.6%,
// int4:g4 77.8/77.0% prefill/decode after it). Tried and dropped (slower on the H100): 16 elements
// per lane with qk_norm (V = 2, W = D/16: 72.7-83.9% at 3 or 4 blocks/SM), a team's Q rows two at a
// time (65-75%: spills at 64 registers, fewer warps at 80), 5 blocks/SM (48 registers: 67-72%).
// cw_inv_sqrt_probe compares the two over every bit pattern x >= 0 (tests/test_cache_write.py).
__device__ __forceinline__ float inv_sqrt_rn(float x) {
#if CW_FAST_RSQRT
  if ((u32)__float_as_uint(x) - 0x0d000000u <= 0x727fffffu) {
    float y, s, h;
    asm("rsqrt.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    asm("mul.ftz.f32 %0, %1, %2;" : "=f"(s) : "f"(x), "f"(y));
    asm("mul.ftz.f32 %0, %1, 0f3F000000;" : "=f"(h) : "f"(y));
    s = __fmaf_rn(__fmaf_rn(-s, s, x), h, s);          // RN(sqrt(x))
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(s));
    return __fmaf_rn(r, -__fmaf_rn(r, s, -1.0f), r);   // RN(1 / s)
  }
#endif
  return __frcp_rn(__fsqrt_rn(x));
}

// Self-test of inv_sqrt_rn: counts the x with bits lo, lo + 1, ..., lo + n - 1 (grid-stride) where it
// differs from __frcp_rn(__fsqrt_rn(x)) bitwise (NaN equals NaN).
__global__ void cw_inv_sqrt_probe(u32 lo, u32 n, unsigned long long* bad) {
  u32 cnt = 0;
  for (u32 j = blockIdx.x * blockDim.x + threadIdx.x; j < n; j += gridDim.x * blockDim.x) {
    const float x = __uint_as_float(lo + j);
    const float a = inv_sqrt_rn(x), b = __frcp_rn(__fsqrt_rn(x));
    cnt += (__float_as_uint(a) != __float_as_uint(b)) && !(a != a && b != b);
  }
  if (cnt) atomicAdd(bad, (unsigned long long)cnt);
}

// qk_norm (SPEC §4.5) of the lane's 8 values given the lane's float64 sum of squares ss:
// ms = RN_f32(sum y^2 / D), r = RN(1 / RN(sqrt(RN(ms + eps)))), y = RN(y * r).
template <int W>
__device__ __forceinline__ void qk_norm8_ss(float (&y)[8], double ss, float eps) {
  ss = team_sum_f64<W>(ss);
  const float ms = __double2float_rn(__dmul_rn(ss, 1.0 / (8 * W)));   // D is a power of two: exact
  const float r = inv_sqrt_rn(__fadd_rn(ms, eps));
#pragma unroll
  for (int k = 0; k < 8; ++k) y[k] = __fmul_rn(y[k], r);
}

// qk_norm without a position encoding: the squares of the fp32 values (exact in float64) are summed
// in float64 like the reference, so ms is almost always the reference's fp32 value (the spec allows
// any fp32 summation; this one keeps code flips rare; an exact fp32 TwoSum costs more instructions
// on the H100). After RoPE / xPos the kernel sums the squares of the float64 results before their
// RN_f32 instead (rotate8<W, true>): that sum is within 2^-23 (relative) of the reference's, so ms
// moves by one ulp in a few percent of the rows and r in about half of those, and each then moves an
// element's bf16 value or code only where it lies within an fp32 ulp of a rounding boundary (about
// 1e-6 of the values; the budget is 1e-4: on the H100, 3-4 of 4.2M xq_out values and 1 of 8192 K
// qparam words moved for 1024 tokens of 48 heads). It saves one float64 conversion per element,
// which runs at a quarter of the float64 FMA rate on sm_90 (fp8 + qk_norm: 75.3% -> 77.9% of copy).
template <int W>
__device__ __forceinline__ void qk_norm8(float (&y)[8], float eps) {
  double s0 = 0.0, s1 = 0.0;
#pragma unroll
  for (int k = 0; k < 8; k += 2) {
    const double a = (double)y[k], b = (double)y[k + 1];
    s0 = __fma_rn(a, a, s0);   // a*a is exact in float64, so this is RN(RN(a*a) + s0): no contraction
    s1 = __fma_rn(b, b, s1);
  }
  qk_norm8_ss<W>(y, __dadd_rn(s0, s1), eps);
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

// Where token i's rows go and whether it is kept (SPEC §5.2).
struct CwToken {
  i64 slot;     // physical cache row of (b, c) without the head: b*capacity + c, or page*S + c%S
  int p;        // RoPE position
  int b;        // lane
  bool keep;
};

__device__ __forceinline__ CwToken cw_token(int i, i64 vt, const int* lanes, const int* pos,
                                            const int* cpos, const int* btab, bool q_only, int B,
                                            int capacity, int max_pages, int S, int n_pages) {
  CwToken t;
  t.p = pos[i];
  const int c = cpos ? cpos[i] : t.p;
  t.b = lanes ? lanes[i] : i;
  t.slot = 0;
  t.keep = (i64)i < vt && t.p >= 0 && c >= 0;
  if (B >= 0) t.keep = t.keep && t.b >= 0 && t.b < B;
  if (t.keep && !q_only) {
    if (c >= capacity) {
      t.keep = false;
    } else if (btab) {
      const int pid = btab[(i64)t.b * max_pages + c / S];
      if (pid < 0 || pid >= n_pages) t.keep = false;
      else t.slot = (i64)pid * S + c % S;
    } else {
      t.slot = (i64)t.b * capacity + c;
    }
  }
  return t;
}

// PATH: 0 every input layout (the flags decide at run time); 1 / 2 the common case compiled
// straight: 16-byte vector inputs through the cp.async ring, int32 offsets, vector cache stores, no
// write-back, and interleaved (1) or half-split (2) RoPE pairs. Fewer branches and registers: on the
// H100 the qk_norm rows went from 84.7 / 77.6% to about 87 / 86.5% of copy (fp8 / int4:g4 prefill).
template <int FMT, int G, int W, bool NORM, int PATH>
__global__ void __launch_bounds__(CW_BLOCK, NORM ? CW_MINB_NORM : CW_MINB) write_kv(
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
    int n_tok, int n_h, int n_kvh, int B, int capacity, int max_pages, int S, int n_pages, i64 row_bytes,
    int amax_cols, float eps, int mode, int flags, int npf, int stages_arg, int ch) {
  constexpr int D = 8 * W, H = D / 2;
  // The ring is CW_STAGES tokens deep (the host passes the same; a constant keeps the per-token
  // ring index a mask instead of an integer division).
  constexpr int stages = CW_STAGES;
  (void)stages_arg;
  __shared__ __align__(16) double s_tab[CW_TAB];   // [ch][cos, sin, zq, zk][H], pairs at tab_pos(p)
  __shared__ i64 s_slot[CW_CH_MAX];
  __shared__ int s_b[CW_CH_MAX];
  __shared__ int s_fl[CW_CH_MAX];             // bit 0: keep, bit 1: fp8_head K/V scales precomputed
  extern __shared__ uint4 s_ring[];           // [stages][npf][blockDim.x] when CW_ASYNC

  const int gx = gridDim.x;
  if ((int)blockIdx.x >= n_tok) return;
  const int K = (n_tok - (int)blockIdx.x + gx - 1) / gx;   // this block's tokens
  const int team = threadIdx.x / W, lane = threadIdx.x % W;
  const int teams = blockDim.x / W;
  const int e0 = lane * 8;
  const bool q_only = xk == nullptr;
  constexpr bool FAST = PATH != 0;   // the host checked the flags this implies
  const bool vin = FAST || (flags & CW_VEC_IN), vcache = FAST || (flags & CW_VEC_CACHE);
  const bool async = FAST || (flags & CW_ASYNC);
  const bool inter = PATH == 1 || (PATH == 0 && (flags & CW_INTERLEAVED)), norm = NORM;   // compile time: the norm-free kernel carries none of its registers
  const int rows = q_only ? n_h : n_h + 2 * n_kvh;
  const int r0 = blockIdx.y * teams + team;
  const int rstep = gridDim.y * teams;
  const int nt = mode == 2 ? 4 : 2;           // tables per token

  auto token = [&](int k) -> int { return (int)blockIdx.x + k * gx; };
  // Row addresses are integer work on every row of every token: with CW_OFF32 the offsets are int32
  // (one IMAD each) instead of int64 products.
  const bool off32 = FAST || (flags & CW_OFF32);
  auto row_ptr = [&](int tok, int r) -> const u16* {
    if (off32) {
      if (r < n_h) return xq + (tok * (int)xq_t + r * (int)xq_h);
      if (r < n_h + n_kvh) return xk + (tok * (int)xk_t + (r - n_h) * (int)xk_h);
      return xv + (tok * (int)xv_t + (r - n_h - n_kvh) * (int)xv_h);
    }
    if (r < n_h) return xq + (i64)tok * xq_t + (i64)r * xq_h;
    if (r < n_h + n_kvh) return xk + (i64)tok * xk_t + (i64)(r - n_h) * xk_h;
    return xv + (i64)tok * xv_t + (i64)(r - n_h - n_kvh) * xv_h;
  };
  // The thread's ring entry for row j of stage st: ring_sa + (st * npf + j) * ring_row as a 32-bit
  // shared address (the ring holds at most _RING_MAX / 16 entries: int indices).
  const u32 ring_sa = (u32)__cvta_generic_to_shared(s_ring) + threadIdx.x * 16u;
  const u32 ring_row = blockDim.x * 16u;
  auto issue = [&](int k, int st) {
    if (k < K) {
      const int tok = token(k);
      u32 sa = ring_sa + (u32)(st * npf) * ring_row;
      for (int j = 0; j < npf; ++j, sa += ring_row) {
        const int r = r0 + j * rstep;
        if (r < rows) cp_async16_sa(sa, row_ptr(tok, r) + e0);
      }
    }
    cp_async_commit();
  };

  if (async)
    for (int st = 0; st < stages - 1; ++st) issue(st, st);
  i64 vt = vt_host;
  if (vt_kind == 1) vt = *reinterpret_cast<const int*>(vt_ptr);
  else if (vt_kind == 2) vt = *reinterpret_cast<const long long*>(vt_ptr);

  for (int c0 = 0; c0 < K; c0 += ch) {
    const int cn = min(ch, K - c0);
    // ---- the chunk's tokens, then their position tables
    if ((int)threadIdx.x < cn) {
      const int i = token(c0 + threadIdx.x);
      const CwToken t = cw_token(i, vt, lanes, pos, cpos, btab, q_only, B, capacity, max_pages, S, n_pages);
      s_slot[threadIdx.x] = t.slot;
      s_b[threadIdx.x] = t.b;
      s_fl[threadIdx.x] = (t.keep ? 1 : 0) | ((flags & CW_ALL_PRE) || (pre && pre[i]) ? 2 : 0);
    }
    if (mode) {
      for (int w = threadIdx.x; w < cn * H; w += blockDim.x) {
        const int tt = w / H, pp = w - tt * H;
        const int p = pos[token(c0 + tt)];
        double* tab = s_tab + tt * nt * H;
        const double a = __dmul_rn((double)p, freqs[pp]);
        double sn, cs;
        sincos(a, &sn, &cs);
        const int q = tab_pos<H>(pp, inter);
        tab[q] = cs;
        tab[H + q] = sn;
        if (mode == 2) {
          const double e = __ddiv_rn(__dsub_rn((double)p, xoff), xbase);
          tab[2 * H + q] = pow(zeta[pp], e);
          tab[3 * H + q] = pow(zeta[pp], -e);   // (pos - off) / (-scale_base) == -e exactly
        }
      }
    }
    __syncthreads();
    // ---- the chunk's tokens, one after the other
    for (int tt = 0; tt < cn; ++tt) {
      const int k = c0 + tt, i = token(k);
      const int st = k % stages;
      if (async) {
        issue(k + stages - 1, (k + stages - 1) % stages);
        cp_async_wait(stages - 1);
      }
      const int fl = s_fl[tt];
      if (!(fl & 1)) {
        const float zero[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int r = r0; r < n_h; r += rstep)
          store_bf16x8_rt(out + (off32 ? (i64)((i * n_h + r) * D) : ((i64)i * n_h + r) * D) + e0, zero, vin);
        continue;
      }
      const i64 slot = s_slot[tt];
      const int b = s_b[tt];
      const bool precomputed = fl & 2;
      const double* tab = s_tab + tt * nt * H;
      const uint4* ring = s_ring + st * npf * (int)blockDim.x + (int)threadIdx.x;   // this thread's row 0
      for (int j = 0;; ++j, ring += blockDim.x) {
        const int r = r0 + j * rstep;
        if (r >= rows) break;
        const uint4 u = async ? *ring : load_raw8(row_ptr(i, r) + e0, vin);
        float y[1][8];
        unpack_bf16x8(u, y[0]);
        const int kind = r < n_h ? 0 : (r < n_h + n_kvh ? 1 : 2);
        if (kind != 2) {
          const double* zt = tab + (kind == 0 ? 2 : 3) * H;
          double ss = 0.0;
#if CW_SS_UNROUNDED
          if (mode && norm) {
            rotate8<W, true>(y[0], u, e0, inter, mode == 2, tab, tab + H, zt, ss);
            qk_norm8_ss<W>(y[0], ss, eps);
          } else
#endif
          {
            if (mode) rotate8<W, false>(y[0], u, e0, inter, mode == 2, tab, tab + H, zt, ss);
            if (norm) qk_norm8<W>(y[0], eps);
          }
        }
        if (kind == 0) {
          store_out8(out + (off32 ? (i64)((i * n_h + r) * D) : ((i64)i * n_h + r) * D) + e0, y[0], vin);
          if (!FAST && (flags & CW_Q_BACK)) store_bf16x8_rt(xq + (i64)i * xq_t + (i64)r * xq_h + e0, y[0], vin);
          if (FMT == FMT_FP8_HEAD && amax) amax_row<W>(amax + (i64)b * amax_cols + r, y[0], lane);
          continue;
        }
        const int h = kind == 1 ? r - n_h : r - n_h - n_kvh;
        if (!FAST && kind == 1 && (flags & CW_K_BACK))
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
    __syncthreads();   // the next chunk overwrites the token records and tables
  }
  if (async) cp_async_wait(0);
}
