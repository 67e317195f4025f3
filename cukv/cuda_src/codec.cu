// cukv/cuda_src/codec.cu: the row codec, cukv.quantize / cukv.dequantize (SPEC §2.7).
//
// quantize_rows<InT, FMT, G, W, V, FIT>: n_rows rows of D elements (InT = bf16_t / f16_t / float,
//   C-contiguous) -> n_rows rows of R bytes in FMT (2D bytes for bf16) (rows.cuh gives the byte layout).
//   fp8 with `words` non-null writes the qparam word there (external) and R = D; fp8_head reads one
//   float32 scale per row. FIT: D == 8*W*V known at compile time.
// quantize_int4_owned<InT, G, V>: int4:gG rows whose groups are 8V elements, one group per lane.
// quantize_int4_staged<InT, W, V>: int4:g1 rows of D = 8WV (W <= 8) written through shared memory
//   as 16-byte aligned spans of a warp's rows.
// dequantize_rows<FMT, G, W, V>: the inverse, to bf16 rows of D elements.
// One team of W lanes per row; lanes hold V chunks of 8 elements. `vec` selects 16-byte (input) and
// 4/16-byte (output) accesses; the host sets it when every base pointer is aligned for them.
// quantize_rows keeps whole warps together (teams past the end redo the last row and store the same
// bytes), so its team shuffles use the full-warp mask.
#define CUKV_FULL_WARP_TEAMS
#include "rows.cuh"

// Rows each team encodes at a time. With the prefetch below one row per team is best on the H100
// (fp8 90% vs 88% of copy for two rows, int4:g4 66% vs 63%: fewer registers, more resident warps).
#ifndef CUKV_CODEC_ROWS
#define CUKV_CODEC_ROWS(V) 1
#endif

#ifndef CUKV_QUANT_MIN_BLOCKS
#define CUKV_QUANT_MIN_BLOCKS 1
#endif

// One chunk of 8 input elements as raw 16-byte words (bf16 / f16: one, float: two), so a prefetched
// chunk costs 4 (8) registers until it is widened.
template <typename InT> struct RawChunk {
  static constexpr int N = sizeof(InT) / 2;
  uint4 u[N];
  __device__ __forceinline__ void load(const InT* p) {
#pragma unroll
    for (int k = 0; k < N; ++k) u[k] = reinterpret_cast<const uint4*>(p)[k];
  }
  __device__ __forceinline__ void widen(float (&f)[8]) const {
    Chunk<InT, true>::load(reinterpret_cast<const InT*>(u), f);   // register-only: u is local
  }
};

// Encode the team's NR rows starting at row0 (rows past the end redo the last row: same bytes).
template <int FMT, int G, int W, int V, bool VEC, int NR>
__device__ __forceinline__ void quantize_team_rows(const float (&y)[NR][V][8], i64 row0, i64 n_rows, int D,
                                                   int lane, u8* __restrict__ out, int R,
                                                   int* __restrict__ words, const float* __restrict__ scale) {
#pragma unroll
  for (int r = 0; r < NR; ++r) {
    const i64 row = min(row0 + r, n_rows - 1);
    int* w = words ? words + row : nullptr;
    const float inv = FMT == FMT_FP8_HEAD ? __frcp_rn(scale[row]) : 0.0f;
    encode_row<FMT, G, W, V, VEC>(y[r], D, lane, out + row * (i64)R, w, inv);
  }
}

// Launched with 128-thread blocks and a grid of at most one wave of resident blocks: teams stride
// over the rows (team t takes rows NR*t, NR*(t + n_teams), ...), and with 16-byte inputs each team
// loads its next rows before it encodes the current ones, so loads stay in flight while it computes.
// FIT: the host checked D == 8*W*V, so D is a compile-time constant: no chunk-validity tests, and the
// INT4 group layout (sub-team or general) is resolved at compile time (no out-of-line call that
// would take y's address and move it to local memory).
template <typename InT, int FMT, int G, int W, int V, bool FIT>
__global__ void __launch_bounds__(128, CUKV_QUANT_MIN_BLOCKS) quantize_rows(const InT* __restrict__ x, i64 n_rows, int D_arg, u8* __restrict__ out, int R,
                              int* __restrict__ words, const float* __restrict__ scale, int vec) {
  constexpr int NR = CUKV_CODEC_ROWS(V);
  const int D = FIT ? 8 * W * V : D_arg;
  const i64 tid = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  const int lane = threadIdx.x % W;
  const i64 n_teams = (i64)gridDim.x * blockDim.x / W;
  // A warp stays or leaves as a whole (full-warp shuffles): its first team decides.
  i64 t = tid / W, wt = (tid & ~(i64)31) / W;
  if (wt * NR >= n_rows) return;
  if (vec) {
    RawChunk<InT> raw[NR][V];
    auto fetch = [&](i64 team) {
#pragma unroll
      for (int r = 0; r < NR; ++r) {
        const InT* src = x + min(team * NR + r, n_rows - 1) * (i64)D;
#pragma unroll (V <= 4 ? V : 1)
        for (int c = 0; c < V; ++c)
          if (chunk_valid<W>(c, lane, D)) raw[r][c].load(src + chunk_elem<W>(c, lane));
      }
    };
    fetch(t);
    for (;;) {
      float y[NR][V][8];
#pragma unroll
      for (int r = 0; r < NR; ++r)
#pragma unroll (V <= 4 ? V : 1)
        for (int c = 0; c < V; ++c)
          if (chunk_valid<W>(c, lane, D)) raw[r][c].widen(y[r][c]);
      const bool more = (wt + n_teams) * NR < n_rows;
      if (more) fetch(t + n_teams);
      quantize_team_rows<FMT, G, W, V, true, NR>(y, t * NR, n_rows, D, lane, out, R, words, scale);
      if (!more) break;
      t += n_teams;
      wt += n_teams;
    }
  } else {
    for (; wt * NR < n_rows; t += n_teams, wt += n_teams) {
      float y[NR][V][8];
#pragma unroll
      for (int r = 0; r < NR; ++r) {
        const InT* src = x + min(t * NR + r, n_rows - 1) * (i64)D;
#pragma unroll (V <= 4 ? V : 1)
        for (int c = 0; c < V; ++c)
          if (chunk_valid<W>(c, lane, D)) Chunk<InT, false>::load(src + chunk_elem<W>(c, lane), y[r][c]);
      }
      quantize_team_rows<FMT, G, W, V, false, NR>(y, t * NR, n_rows, D, lane, out, R, words, scale);
    }
  }
}

// INT4 with G > 1 groups of 8V elements, lane-owned: a team of G lanes per row, lane g holds group g
// (V chunks, 8V consecutive elements, loaded as V 16-byte words). Each lane reduces, derives its
// group's scale and encodes on its own: no shuffles, one scale division per 8V elements instead of
// per chunk, and the nibbles leave in one 16-byte (V = 4, G >= 4) or V/2 8-byte stores. The codes are
// the sub-team encoder's (rows.cuh int4_group / int4_codes8 / int4_word). Launched with 128-thread
// blocks, one wave of resident blocks; teams stride over the rows and prefetch their next row.
// The host uses it only with 16-byte aligned x and out (every access below is vectorized).
template <typename InT, int G, int V>
__global__ void __launch_bounds__(128) quantize_int4_owned(const InT* __restrict__ x, i64 n_rows,
                                                           u8* __restrict__ out) {
  constexpr int D = 8 * G * V, R = D / 2 + 4 * G;
  const int g = threadIdx.x % G;
  const i64 n_teams = (i64)gridDim.x * (blockDim.x / G);
  i64 row = ((i64)blockIdx.x * blockDim.x + threadIdx.x) / G;
  if (row >= n_rows) return;
  RawChunk<InT> raw[V];
  auto fetch = [&](i64 r) {
    const InT* src = x + r * D + g * 8 * V;
#pragma unroll
    for (int c = 0; c < V; ++c) raw[c].load(src + 8 * c);
  };
  fetch(row);
  for (;;) {
    float y[V][8];
#pragma unroll
    for (int c = 0; c < V; ++c) raw[c].widen(y[c]);
    const i64 next = row + n_teams;
    const bool more = next < n_rows;
    if (more) fetch(next);
    float mn = __int_as_float(0x7f800000), mx = -__int_as_float(0x7f800000);
#pragma unroll
    for (int c = 0; c < V; ++c) chunk_minmax(y[c], mn, mx);
    const u32 bad = nonfinite(mn, mx);
    const Int4Group grp = int4_group(mn, mx);
    u32 p[V];
#pragma unroll
    for (int c = 0; c < V; ++c) p[c] = bad ? 0u : int4_codes8(y[c], grp);
    u8* dst = out + row * R;
    *reinterpret_cast<u32*>(dst + 4 * g) = int4_word(grp.s, mn, bad);
    u8* nib = dst + 4 * G + g * 4 * V;
    if constexpr (V == 4 && G >= 4) {
      *reinterpret_cast<uint4*>(nib) = make_uint4(p[0], p[1], p[2], p[3]);
    } else {
#pragma unroll
      for (int c = 0; c < V; c += 2) *reinterpret_cast<uint2*>(nib + 4 * c) = make_uint2(p[c], p[c + 1]);
    }
    if (!more) break;
    row = next;
  }
}

// NaN-propagating min / max of two bf16x2 or f16x2 words (sm_80+); the first argument picks the type.
#define CUKV_MINMAX_X2(NAME, OP, T, PTX)                                              \
  __device__ __forceinline__ u32 NAME(T, u32 a, u32 b) {                               \
    u32 r;                                                                             \
    asm(OP ".NaN." PTX " %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));                     \
    return r;                                                                          \
  }
CUKV_MINMAX_X2(min_nan_x2, "min", bf16_t, "bf16x2")
CUKV_MINMAX_X2(max_nan_x2, "max", bf16_t, "bf16x2")
CUKV_MINMAX_X2(min_nan_x2, "min", f16_t, "f16x2")
CUKV_MINMAX_X2(max_nan_x2, "max", f16_t, "f16x2")
#undef CUKV_MINMAX_X2

// Min and max (NaN-propagating) over V raw chunks, as chunk_minmax of the widened values gives them.
// 16-bit inputs fold the packed words first (widening is exact and monotonic and keeps NaN and inf,
// so the packed min / max widen to the same values), half the instructions of the fp32 fold.
template <typename InT, int V>
__device__ __forceinline__ void raw_minmax(const RawChunk<InT> (&raw)[V], float& mn, float& mx) {
  if constexpr (sizeof(InT) == 4) {   // float
    mn = __int_as_float(0x7f800000), mx = -__int_as_float(0x7f800000);
#pragma unroll
    for (int c = 0; c < V; ++c) {
      float y[8];
      raw[c].widen(y);
      chunk_minmax(y, mn, mx);
    }
  } else {
    u32 lo[2], hi[2];   // two independent chains over the word pairs (x, y) and (z, w)
#pragma unroll
    for (int c = 0; c < V; ++c) {
      const uint4 u = raw[c].u[0];
      const u32 l0 = min_nan_x2(InT{}, u.x, u.y), l1 = min_nan_x2(InT{}, u.z, u.w);
      const u32 h0 = max_nan_x2(InT{}, u.x, u.y), h1 = max_nan_x2(InT{}, u.z, u.w);
      lo[0] = c ? min_nan_x2(InT{}, lo[0], l0) : l0;
      lo[1] = c ? min_nan_x2(InT{}, lo[1], l1) : l1;
      hi[0] = c ? max_nan_x2(InT{}, hi[0], h0) : h0;
      hi[1] = c ? max_nan_x2(InT{}, hi[1], h1) : h1;
    }
    lo[0] = min_nan_x2(InT{}, lo[0], lo[1]);
    hi[0] = max_nan_x2(InT{}, hi[0], hi[1]);
    const float a = to_f32(InT{(u16)(lo[0] & 0xffffu)}), b = to_f32(InT{(u16)(lo[0] >> 16)});
    const float c = to_f32(InT{(u16)(hi[0] & 0xffffu)}), d = to_f32(InT{(u16)(hi[0] >> 16)});
    mn = fmin_nan(a, b);
    mx = fmax_nan(c, d);
  }
}

// int4:g1 with teams of W <= 8 lanes and D = 8WV known: a warp's 32/W teams hold 32/W consecutive
// rows (warps start at multiples of 32/W rows), whose R = D/2 + 4 bytes each make one span of
// (32/W) * R bytes, a multiple of 16 (R % 4 == 0, 32/W >= 4), so 16-byte aligned when `out` is. The
// teams encode into their slots of a per-warp buffer in shared memory, and the warp writes the span
// with coalesced 16-byte stores, instead of 4-byte stores scattered over rows whose 68 bytes
// (D = 128) straddle sectors. A team encodes its row as quantize_int4_owned encodes a group (rows.cuh
// int4_group / int4_codes8 / int4_word, the same bytes as encode_row), after a packed min / max over
// the raw 16-bit words (raw_minmax) and a team butterfly; it widens one chunk at a time, so the row
// in flight costs no float registers. Same schedule as quantize_rows: 128-thread blocks, one wave of
// resident blocks, teams stride over the rows and prefetch their next row. The host uses it only with
// 16-byte aligned x and out. On the H100 (bf16, D = 128, 2^19 rows): quantize_rows 80% of copy, this
// kernel encoding with encode_row 81%, as written 85%. 16-bit inputs are held to 72 registers (7
// blocks per SM, no spills) by CUKV_INT4_STAGED_MIN_BLOCKS; unbounded (75 registers, 6 blocks) was
// within 0.8% of it for D = 64/128/256 (85.1/85.0/86.4% vs 84.7/85.3/85.6%); min 8 blocks (64
// registers, spills) 78%; teams of 2 lanes x 8 chunks 80%.
#ifndef CUKV_INT4_STAGED_MIN_BLOCKS
#define CUKV_INT4_STAGED_MIN_BLOCKS 7
#endif
template <typename InT, int W, int V>
__global__ void __launch_bounds__(128, sizeof(InT) == 2 ? CUKV_INT4_STAGED_MIN_BLOCKS : 1)
quantize_int4_staged(const InT* __restrict__ x, i64 n_rows, u8* __restrict__ out) {
  constexpr int D = 8 * W * V, R = D / 2 + 4, TEAMS = 32 / W, SPAN = TEAMS * R, N16 = SPAN / 16;
  static_assert(W <= 8 && SPAN % 16 == 0, "a warp's rows must form whole 16-byte pieces");
  __shared__ __align__(16) u32 stage[4][SPAN / 4];   // 128-thread blocks: 4 warps
  const int lane = threadIdx.x % W, wl = threadIdx.x & 31;
  u32* wst = stage[threadIdx.x / 32];
  u8* slot = reinterpret_cast<u8*>(wst) + (wl / W) * R;
  const i64 n_teams = (i64)gridDim.x * (blockDim.x / W);
  i64 row = ((i64)blockIdx.x * blockDim.x + threadIdx.x) / W;
  i64 row0 = row - wl / W;   // the warp's first row: the warp stays or leaves as a whole
  if (row0 >= n_rows) return;
  // Two raw buffers: the row being encoded and the next row, in flight meanwhile; chunks widen one at
  // a time. (Two steps per pass with the buffers swapping roles would save the 4V register copies at
  // the end of a pass, but needs 84 registers and spills when held to 72.)
  RawChunk<InT> cur[V], nxt[V];
  auto fetch = [&](RawChunk<InT> (&buf)[V], i64 r) {
    const InT* src = x + min(r, n_rows - 1) * D;   // rows past the end redo the last row (not written)
#pragma unroll
    for (int c = 0; c < V; ++c) buf[c].load(src + chunk_elem<W>(c, lane));
  };
  fetch(cur, row);
  for (;;) {
    const bool more = row0 + n_teams < n_rows;
    if (more) fetch(nxt, row + n_teams);
    float mn, mx;
    raw_minmax<InT, V>(cur, mn, mx);
    team_minmax_nan<W>(mn, mx);
    const u32 bad = nonfinite(mn, mx);
    const Int4Group grp = int4_group(mn, mx);
#pragma unroll
    for (int c = 0; c < V; ++c) {
      float y[8];
      cur[c].widen(y);
      reinterpret_cast<u32*>(slot + 4)[c * W + lane] = bad ? 0u : int4_codes8(y, grp);
    }
    if (lane == 0) *reinterpret_cast<u32*>(slot) = int4_word(grp.s, mn, bad);
    __syncwarp();
    u8* dst = out + row0 * R;
    if (row0 + TEAMS <= n_rows) {
#pragma unroll
      for (int k = 0; k < (N16 + 31) / 32; ++k) {
        const int i = wl + 32 * k;
        if (i < N16) reinterpret_cast<uint4*>(dst)[i] = reinterpret_cast<const uint4*>(wst)[i];
      }
    } else {   // the last, partial span: whole rows below n_rows, 4-byte stores
      const int nw = (int)(n_rows - row0) * (R / 4);
#pragma unroll 1
      for (int i = wl; i < nw; i += 32) reinterpret_cast<u32*>(dst)[i] = wst[i];
    }
    __syncwarp();   // the span is read before the next rows overwrite the buffer
    if (!more) break;
    row += n_teams;
    row0 += n_teams;
#pragma unroll
    for (int c = 0; c < V; ++c) cur[c] = nxt[c];
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
