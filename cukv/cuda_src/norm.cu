// cukv/cuda_src/norm.cu: RMS norm, cukv.rms_norm (SPEC §9).
//
//   ms  = RN_f32(sum_i x_i^2 / N)          (fp32 sum of RN_f32(x_i*x_i); order below)
//   r   = RN_f32(1 / RN_f32(sqrt(RN_f32(ms + eps))))
//   y_i = RN_bf16(RN_f32(RN_f32(x_i * r) * w_i))       (w_i = 1 without a weight: y_i = RN_bf16(x_i*r))
//
// Layout: x is n_rows rows of N elements (InT = bf16_t / f16_t / float), row r at x + r*row_stride
// elements (unit stride inside a row; the host makes other layouts contiguous). weight is N contiguous
// elements (WT = bf16_t / float) or absent (WT = none_t). out is n_rows contiguous bf16 rows.
//
// rms_norm_rows<InT, WT, W, V>: the row stays in registers. A row belongs to a team of L = W*nw lanes
// (nw warps of W = 32 lanes, or one team of W <= 32 lanes when nw = 1); lane l holds V chunks of 8
// elements, chunk c covering elements [(c*L + l)*8, +8): consecutive lanes touch consecutive 16 bytes.
// Each lane sums its squares in chunk order, team_sum<W> (XOR butterfly) completes the warp, and with
// nw > 1 the nw warp sums go through shared memory and every lane adds them in warp order, so every
// lane of the row holds the same whole-row sum (SPEC §2.6).
// rms_norm_stream<InT, WT>: any N. One block per row loops over its chunks twice: sum of squares, then
// re-read (mostly from L2/L1), scale and store. The host uses it for rows too long for registers.
// The weight is read after the reduction: preloading it costs registers, and resident warps (registers
// per lane, one row per block) are what bound this memory-bound kernel (scripts/bench_norm.py compares
// the plans).
// `vec` (runtime, uniform) selects 16-byte loads and stores; the host sets it when x, the row stride,
// weight and out are all 16-byte aligned, else every access is element-wise.
//
// Non-finite values stay in their row (SPEC §11.4): nothing crosses a row except through its own
// shared-memory slots. Compiled with --fmad=false (exact family); the divide and sqrt are the
// correctly rounded intrinsics.
#include "common.cuh"

struct none_t {};  // WT of a call without a weight (w_i = 1)
template <typename T> struct is_none { static constexpr bool value = false; };
template <> struct is_none<none_t> { static constexpr bool value = true; };

// Load chunk `e` (element offset) of the weight as floats.
template <typename WT>
__device__ __forceinline__ void load_weight(const WT* w, int e, bool vec, float (&f)[8]) {
  if constexpr (!is_none<WT>::value) {
    if (vec) Chunk<WT, true>::load(w + e, f);
    else Chunk<WT, false>::load(w + e, f);
  }
}

template <typename InT>
__device__ __forceinline__ void load_x(const InT* p, bool vec, float (&f)[8]) {
  if (vec) Chunk<InT, true>::load(p, f);
  else Chunk<InT, false>::load(p, f);
}

// Scale one chunk by r (and the weight) and store it as bf16.
template <typename WT>
__device__ __forceinline__ void finish_chunk(float (&f)[8], float r, const WT* w, int e, bool vec,
                                             u16* dst) {
  float wf[8];
  load_weight<WT>(w, e, vec, wf);
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    float v = __fmul_rn(f[k], r);
    if constexpr (!is_none<WT>::value) v = __fmul_rn(v, wf[k]);
    f[k] = v;
  }
  if (vec) store_bf16x8<true>(dst + e, f);
  else store_bf16x8<false>(dst + e, f);
}

__device__ __forceinline__ float rms_factor(float sumsq, int N, float eps) {
  const float ms = __fdiv_rn(sumsq, (float)N);
  return __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(ms, eps)));
}

__device__ __forceinline__ float chunk_sumsq(const float (&f)[8], float acc) {
#pragma unroll
  for (int k = 0; k < 8; ++k) acc = __fadd_rn(acc, __fmul_rn(f[k], f[k]));
  return acc;
}

template <typename InT, typename WT, int W, int V>
__global__ void rms_norm_rows(const InT* __restrict__ x, i64 n_rows, int N, i64 row_stride,
                              const WT* __restrict__ weight, float eps, u16* __restrict__ out,
                              int nw, int vec) {
  __shared__ float red[32];
  const int L = W * nw;                                  // lanes per row
  const int rows_per_block = blockDim.x / L;
  const int t = threadIdx.x;
  const int l = t % L;                                   // lane within the row team
  const i64 row = (i64)blockIdx.x * rows_per_block + t / L;
  const bool active = row < n_rows;
  const int n8 = N >> 3;
  const InT* src = x + (active ? row : 0) * row_stride;

  float f[V][8];
  float acc = 0.0f;
#pragma unroll
  for (int c = 0; c < V; ++c) {
    const int ch = c * L + l;
    if (active && ch < n8) {
      load_x<InT>(src + (i64)ch * 8, vec, f[c]);
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k) f[c][k] = 0.0f;
    }
  }
#pragma unroll
  for (int c = 0; c < V; ++c) acc = chunk_sumsq(f[c], acc);
  float sum = team_sum<W>(acc);
  if (nw > 1) {                                          // uniform: W == 32 here
    const int warp = t >> 5;
    if ((t & 31) == 0) red[warp] = sum;
    __syncthreads();
    const int first = warp - warp % nw;                  // the row's first warp in the block
    sum = red[first];
    for (int k = 1; k < nw; ++k) sum = __fadd_rn(sum, red[first + k]);
  }
  if (!active) return;
  const float r = rms_factor(sum, N, eps);
  u16* dst = out + row * (i64)N;
#pragma unroll
  for (int c = 0; c < V; ++c) {
    const int ch = c * L + l;
    if (ch < n8) finish_chunk<WT>(f[c], r, weight, ch * 8, vec, dst);
  }
}

template <typename InT, typename WT>
__global__ void rms_norm_stream(const InT* __restrict__ x, i64 n_rows, int N, i64 row_stride,
                                const WT* __restrict__ weight, float eps, u16* __restrict__ out,
                                int vec) {
  __shared__ float red[32];
  const i64 row = blockIdx.x;
  if (row >= n_rows) return;                             // whole block leaves together
  const int t = threadIdx.x;
  const int n8 = N >> 3;
  const InT* src = x + row * row_stride;
  float acc = 0.0f;
  for (int ch = t; ch < n8; ch += blockDim.x) {
    float f[8];
    load_x<InT>(src + (i64)ch * 8, vec, f);
    acc = chunk_sumsq(f, acc);
  }
  float sum = team_sum<32>(acc);
  const int nw = blockDim.x >> 5;
  if ((t & 31) == 0) red[t >> 5] = sum;
  __syncthreads();
  sum = red[0];
  for (int k = 1; k < nw; ++k) sum = __fadd_rn(sum, red[k]);
  const float r = rms_factor(sum, N, eps);
  u16* dst = out + row * (i64)N;
  for (int ch = t; ch < n8; ch += blockDim.x) {
    float f[8];
    load_x<InT>(src + (i64)ch * 8, vec, f);
    finish_chunk<WT>(f, r, weight, ch * 8, vec, dst);
  }
}
