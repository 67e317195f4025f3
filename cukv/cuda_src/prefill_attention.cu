// cukv/cuda_src/prefill_attention.cu: variable-length (causal) prefill attention on tensor cores
// (SPEC §8.2; math as §8.1).
//
// Algorithm: FlashAttention-2 forward. One CTA owns BM = NW*16*MT query rows of one lane and one query
// head; warp w owns rows [w*16*MT, (w+1)*16*MT). The CTA walks the lane's key tiles of BN keys from the
// last visible tile down to the first (tiles past the causal diagonal are never touched):
//   S = Q K^T          mma.sync.m16n8k16 bf16 -> fp32, A = Q (ldmatrix), B = K (ldmatrix)
//   online softmax     per row, in registers: m (running max, log2 units), l (running sum)
//   O += P V           P = exp2(S*scale*log2e - m) rounded to bf16, B = V (ldmatrix.trans)
// and finally O /= l, lse = (m + log2 l) * ln 2. Rows without a visible key give O = 0, lse = -inf.
// Query row r of a lane sits at position r + L_k - L_q and sees keys j <= that (bottom-right causal).
//
// Shared memory (bf16, every tile row-major [rows][D], 16-byte chunk c of row r stored at chunk
// c ^ (r & 7) so that ldmatrix is conflict-free): Q [BM][D], K [BN][D], V [BN][D], one validity
// byte per key of the K tile, two page-id buffers, and for quantized caches the raw-row staging.
// Nothing scales with the sequence length. Pipelining as in
// FlashAttention-2: K and V have one buffer each; V(j) loads (cp.async) while S = Q K(j)^T runs, and
// K(j-1) loads while the softmax and P V(j) run.
//
// K/V layouts (LAYOUT): PF_LINEAR covers packed [T_k, N_KVH, D] (the lane starts at row kstart) and
// padded [B, KV_PAD, N_KVH, D] (lane b at b*stride_b); PF_PAGED reads [1, P*S, N_KVH, R] through
// block tables (a key behind a page id outside [0, P) is excluded from attention). Paged tiles get
// their block-table entries by cp.async one tile ahead (double-buffered page-id array), so no global
// load sits on a tile load's critical path. Strides are in elements of the cache (bytes for uint8
// caches); the host guarantees 16-byte aligned bf16 rows and 4-byte aligned quantized rows.
// FMT != FMT_BF16 (padded or paged quantized caches): the raw rows (and external fp8 words) of a
// tile are cp.async'd into a staging buffer, then decoded chunk by chunk into the bf16 tiles with
// exactly the values of SPEC §2.3-§2.5 (K at the top of an iteration, V after S = Q K^T), so the
// result equals dequantize-then-attend bit for bit.
//
// prefill_plan runs first (one CTA): it clamps every lane's q/k ranges (validate=False guards,
// SPEC §1.4) into plan[b] = {q_start, L_q, k_start, L_k} and prefix-sums the lane's query blocks into
// blk_cum. CTA x of the attention grid takes head x % N_H and block x / N_H, found by binary search;
// blocks are walked from the lane's last (largest causal work) to its first.
#include "mma.cuh"

#define PF_LINEAR 0
#define PF_PAGED 1

#define PF_FMT_BF16 0
#define PF_FMT_FP8 1
#define PF_FMT_FP8_HEAD 2
#define PF_FMT_INT4 3

// ------------------------------------------------------------------------------------ PTX wrappers

// 16-byte global -> shared copy; nbytes = 0 writes 16 zero bytes and reads nothing.
__device__ __forceinline__ void pf_cp_async16(u32 dst, const void* src, u32 nbytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(nbytes));
}
// 4-byte global -> shared copy (quantized rows, block-table entries, qparam words).
__device__ __forceinline__ void pf_cp_async4(u32 dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src));
}

__device__ __forceinline__ void pf_st_shared4(u32 dst, u32 a) {
  asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(dst), "r"(a));
}
__device__ __forceinline__ uint4 pf_ld_shared16(u32 src) {
  uint4 v;
  asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(src));
  return v;
}

// Element offset of 16-byte chunk c of row r in a swizzled [rows][D] tile.
template <int D> __device__ __forceinline__ int pf_sw(int r, int c) { return r * D + ((c ^ (r & 7)) << 3); }

template <bool C, typename A, typename B> struct pf_if { typedef A type; };
template <typename A, typename B> struct pf_if<false, A, B> { typedef B type; };

__device__ __forceinline__ int pf_clamp(int v, int lo, int hi) { return v < lo ? lo : (v > hi ? hi : v); }

// ------------------------------------------------------------------------------------ plan
// plan[b] = {q_start, L_q, k_start, L_k} with every range clamped into its array; blk_cum[b+1] =
// sum_{b' <= b} ceil(L_q(b') / bm) (saturated at INT_MAX). cu_k null: lengths from lens_k (padded or
// paged, k_start = 0). ctl = {clamped cu_q[0], clamped cu_q[B], 1 if clamped cu_q is non-decreasing}:
// the rows that no lane owns are [0, ctl[0]) and [ctl[1], t_q) when ctl[2], else unknown (all).
// One CTA of a multiple of 32 threads.
__global__ void prefill_plan(const int* __restrict__ cu_q, int t_q, const int* __restrict__ cu_k,
                             const int* __restrict__ lens_k, int cap_k, int bm, int n_lanes,
                             int* __restrict__ plan, int* __restrict__ blk_cum, int* __restrict__ ctl) {
  __shared__ long long warp_tot[32];
  __shared__ long long carry;
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
  if (threadIdx.x == 0) { carry = 0; blk_cum[0] = 0; }
  int unsorted = 0;
  __syncthreads();
  for (int base = 0; base < n_lanes; base += blockDim.x) {
    const int b = base + threadIdx.x;
    long long v = 0;
    if (b < n_lanes) {
      const int qs = pf_clamp(cu_q[b], 0, t_q), qe = pf_clamp(cu_q[b + 1], 0, t_q);
      const int lq = qe > qs ? qe - qs : 0;
      unsorted |= qe < qs;
      int ks = 0, lk;
      if (cu_k) {
        ks = pf_clamp(cu_k[b], 0, cap_k);
        const int ke = pf_clamp(cu_k[b + 1], 0, cap_k);
        lk = ke > ks ? ke - ks : 0;
      } else {
        lk = pf_clamp(lens_k[b], 0, cap_k);
      }
      plan[4 * b + 0] = qs;
      plan[4 * b + 1] = lq;
      plan[4 * b + 2] = ks;
      plan[4 * b + 3] = lk;
      v = (lq + bm - 1) / bm;
    }
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const long long t = __shfl_up_sync(CUKV_FULL_MASK, v, o);
      if (lane >= o) v += t;
    }
    if (lane == 31) warp_tot[w] = v;
    __syncthreads();
    if (w == 0) {
      long long t = lane < nw ? warp_tot[lane] : 0;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const long long u = __shfl_up_sync(CUKV_FULL_MASK, t, o);
        if (lane >= o) t += u;
      }
      warp_tot[lane] = t;
    }
    __syncthreads();
    const long long incl = carry + v + (w > 0 ? warp_tot[w - 1] : 0);
    if (b < n_lanes) blk_cum[b + 1] = incl < 0x7fffffffLL ? (int)incl : 0x7fffffff;
    __syncthreads();
    if (threadIdx.x == blockDim.x - 1) carry = incl;
    __syncthreads();
  }
  unsorted = __syncthreads_or(unsorted);
  if (threadIdx.x == 0) {
    ctl[0] = pf_clamp(cu_q[0], 0, t_q);
    ctl[1] = pf_clamp(cu_q[n_lanes], 0, t_q);
    ctl[2] = unsorted ? 0 : 1;
  }
}

// validate=False only: out = 0 and lse = -inf on the query rows that no lane owns (ctl from
// prefill_plan). Grid-stride over 16-byte chunks of those rows; row_chunks = N_H * D / 8.
__global__ void prefill_fill_unowned(const int* __restrict__ ctl, int t_q, int n_heads, int row_chunks,
                                     uint4* __restrict__ out, float* __restrict__ lse) {
  const bool all = ctl[2] == 0;
  const int lo = all ? t_q : ctl[0];      // rows [0, lo) and [hi, t_q)
  const int hi = all ? t_q : (ctl[1] > ctl[0] ? ctl[1] : ctl[0]);
  const long long n_lo = (long long)lo * row_chunks, n_hi = (long long)(t_q - hi) * row_chunks;
  const long long stride = (long long)gridDim.x * blockDim.x;
  const uint4 z = make_uint4(0u, 0u, 0u, 0u);
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n_lo + n_hi; i += stride) {
    const long long c = i < n_lo ? i : (long long)hi * row_chunks + (i - n_lo);
    out[c] = z;
    if (lse && c % row_chunks == 0) {
      const long long r = c / row_chunks;
      for (int h = 0; h < n_heads; ++h) lse[r * n_heads + h] = CUKV_NEG_INF;
    }
  }
}

// ------------------------------------------------------------------------------------ K/V decode
// 8 elements [8c, 8c+8) of one cache row -> four words of two bf16 each (SPEC §2.3-§2.5 values).
//   fp8:      c0, c1 = codes 8c..8c+7, w = (scale | shift << 16) fp16 bits
//   fp8_head: c0, c1 = codes, s = the (lane, KV head) scale
//   int4:     c0 = the 4 bytes of nibbles of the chunk, w = its group's (scale | shift << 16) word
template <int FMT>
__device__ __forceinline__ void pf_decode8(u32 c0, u32 c1, u32 w, float s, u32 (&o)[4]) {
  if (FMT == PF_FMT_INT4) {
    // Pairs of nibbles as fp16 (1024 + q) - 1024 = q (exact), then one fp16x2 fma: RN_f16(q*sc + sh).
    const u32 sc2 = (w & 0xffffu) * 0x10001u, sh2 = (w >> 16) * 0x10001u;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const u32 x = c0 >> (8 * k);
      const u32 h2 = 0x64006400u | (x & 0xfu) | ((x & 0xf0u) << 12);
      u32 q2, y2;
      asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(q2) : "r"(h2), "r"(0x64006400u));
      asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(y2) : "r"(q2), "r"(sc2), "r"(sh2));
      o[k] = pack_bf16x2(f16_to_f32((u16)(y2 & 0xffffu)), f16_to_f32((u16)(y2 >> 16)));
    }
  } else {
    float scale = s, shift = 0.0f;
    if (FMT == PF_FMT_FP8) {
      scale = f16_to_f32((u16)(w & 0xffffu));
      shift = f16_to_f32((u16)(w >> 16));
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const u32 pair = ((k < 2 ? c0 : c1) >> ((k & 1) * 16)) & 0xffffu;
      float lo, hi;
#if __CUDA_ARCH__ >= 890
      u32 h2;                                                  // e4m3 -> fp16 is exact
      asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h2) : "h"((u16)pair));
      lo = f16_to_f32((u16)(h2 & 0xffffu));
      hi = f16_to_f32((u16)(h2 >> 16));
#else
      lo = e4m3_to_f32(pair & 0xffu);
      hi = e4m3_to_f32(pair >> 8);
#endif
      if (FMT == PF_FMT_FP8) {          // the product is exact: one rounding, as SPEC §2.3
        lo = __fmaf_rn(lo, scale, shift);
        hi = __fmaf_rn(hi, scale, shift);
      } else {
        lo = __fmul_rn(lo, scale);
        hi = __fmul_rn(hi, scale);
      }
      o[k] = pack_bf16x2(lo, hi);
    }
  }
}

// ------------------------------------------------------------------------------------ attention
struct PfArgs {
  const u16* q;            // bf16 [*, N_H, D] with strides q_st (token), q_sh (head), elements
  long long q_st, q_sh;
  const void* k;           // cache base (bf16 elements or uint8 bytes)
  const void* v;
  long long k_sb, k_st, k_sh, v_sb, v_st, v_sh;  // strides: lane (linear), row, head
  const int* plan;         // [B][4]
  const int* blk_cum;      // [B+1]
  const int* block_tables; // [B, max_pages] (paged)
  const int* qp_k;         // fp8 external words (contiguous [rows, N_KVH]) or fp8_head scales [B, N_KVH]
  const int* qp_v;
  u16* out;                // bf16 [T_q, N_H, D], contiguous
  float* lse;              // float32 [T_q, N_H] or null
};

template <int D, int MT, int NW, int BN, bool QREG, int LAYOUT, int FMT, int MINB>
__global__ void __launch_bounds__(NW * 32, MINB)
prefill_attention_fwd(const u16* __restrict__ q, long long q_st, long long q_sh,
                      const void* __restrict__ k, const void* __restrict__ v,
                      long long k_sb, long long k_st, long long k_sh,
                      long long v_sb, long long v_st, long long v_sh,
                      const int* __restrict__ plan, const int* __restrict__ blk_cum,
                      const int* __restrict__ block_tables, const int* __restrict__ qp_k,
                      const int* __restrict__ qp_v, u16* __restrict__ out, float* __restrict__ lse,
                      int n_lanes, int n_heads, int group, int n_kvh, int causal, float scale_log2,
                      int max_pages, int page_size, int page_shift, int n_pages, int kv_pad,
                      int n_groups, int row_bytes, int qp_off) {
  const PfArgs a = {q, q_st, q_sh, k, v, k_sb, k_st, k_sh, v_sb, v_st, v_sh, plan, blk_cum,
                    block_tables, qp_k, qp_v, out, lse};
  constexpr int NT = NW * 32;
  constexpr int BM = NW * 16 * MT;
  constexpr int CH = D / 8;               // 16-byte chunks per row
  constexpr int NB = BN / 8;              // n8 blocks of S per m16 tile
  constexpr int ND = D / 8;               // n8 blocks of O per m16 tile
  constexpr bool QUANT = FMT != PF_FMT_BF16;
  constexpr bool PAGED = LAYOUT == PF_PAGED;
  static_assert((BM * CH) % NT == 0 && (BN * CH) % NT == 0, "tile loads must divide evenly");
  static_assert(BN % 16 == 0 && D % 16 == 0, "BN and D must be multiples of 16");

  // Shared memory: Q | K | V (bf16 tiles) | validity bytes [BN] | page ids [2][BN + 4] |
  // quantized only: raw K rows [BN][rsp] | raw V rows [BN][rsp] | fp8 words K [BN] | V [BN].
  extern __shared__ __align__(128) unsigned char pf_smem[];
  const int rw = row_bytes >> 2;          // 4-byte words per quantized row
  const int rsp = (row_bytes + 15) & ~15; // staging row pitch
  const u32 sQ = smem_u32(pf_smem);
  const u32 sK = sQ + BM * D * 2;
  const u32 sV = sK + BN * D * 2;
  const u32 sF = sV + BN * D * 2;
  const u32 sPg = sF + BN;
  const u32 rK = sPg + 8 * (BN + 4);
  const u32 rV = rK + BN * rsp;
  const u32 sWk = rV + BN * rsp;
  const u32 sWv = sWk + BN * 4;

  // Plain (non-volatile) shared accesses for page ids, staged rows and decoded chunks, so the compiler
  // can batch them; cp.async, ldmatrix and the barriers order them against the tile traffic.
  auto sm_u32 = [&](u32 addr) -> u32 { return *reinterpret_cast<const u32*>(pf_smem + (addr - sQ)); };
  auto sm_st16 = [&](u32 addr, const u32 (&o)[4]) {
    *reinterpret_cast<uint4*>(pf_smem + (addr - sQ)) = make_uint4(o[0], o[1], o[2], o[3]);
  };
  auto sm_st8 = [&](u32 addr, u32 v) { pf_smem[addr - sQ] = (unsigned char)v; };

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, tig = lane & 3;

  // ---- which (lane, query block, head)
  const int h = (int)(blockIdx.x % (unsigned)n_heads);
  const int gb = (int)(blockIdx.x / (unsigned)n_heads);
  int lo = 0, hi = n_lanes;
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (a.blk_cum[mid] <= gb) lo = mid; else hi = mid;
  }
  const int b = lo;
  const int qs = a.plan[4 * b + 0], lq = a.plan[4 * b + 1], ks = a.plan[4 * b + 2], lk = a.plan[4 * b + 3];
  const int nblk = (lq + BM - 1) / BM;
  const int local = gb - a.blk_cum[b];
  if (local < 0 || local >= nblk) return;
  const int m0 = (nblk - 1 - local) * BM;
  const int kvh = h / group;
  const int shift = lk - lq;              // query row r sits at position r + shift

  int n_end = lk;
  if (causal) {
    const int last = (m0 + BM < lq ? m0 + BM : lq) - 1;
    const int lim = last + shift + 1;
    n_end = lim < lk ? lim : lk;
  }
  const int n_tiles = n_end > 0 ? (n_end + BN - 1) / BN : 0;

  // ---- K/V row addressing
  typedef typename pf_if<FMT == PF_FMT_BF16, u16, u8>::type CT;
  const CT* kbase = reinterpret_cast<const CT*>(a.k) + (long long)kvh * a.k_sh;
  const CT* vbase = reinterpret_cast<const CT*>(a.v) + (long long)kvh * a.v_sh;
  if (!PAGED) {
    kbase += (long long)b * a.k_sb + (long long)ks * a.k_st;
    vbase += (long long)b * a.v_sb + (long long)ks * a.v_st;
  }
  const int* bt = PAGED ? a.block_tables + (long long)b * max_pages : nullptr;
  const int* qpw_k = FMT == PF_FMT_FP8 && qp_off == 0 ? a.qp_k : nullptr;   // external fp8 words
  const int* qpw_v = FMT == PF_FMT_FP8 && qp_off == 0 ? a.qp_v : nullptr;
  float s_k = 0.0f, s_v = 0.0f;                                              // fp8_head scales
  if (FMT == PF_FMT_FP8_HEAD) {
    s_k = __int_as_float(a.qp_k[(long long)b * n_kvh + kvh]);
    s_v = __int_as_float(a.qp_v[(long long)b * n_kvh + kvh]);
  }

  auto pdiv = [&](int t) -> int { return page_shift >= 0 ? t >> page_shift : t / page_size; };
  auto pmod = [&](int t) -> int { return page_shift >= 0 ? t & (page_size - 1) : t % page_size; };

  // Paged: the block-table entries of the tile starting at n0 go to page-id buffer buf by cp.async
  // one tile ahead, so no global load sits on the critical path of a tile load.
  auto prefetch_pages = [&](int n0, int buf) {
    const int p0 = pdiv(n0);
    const int cnt = pdiv((n0 + BN < lk ? n0 + BN : lk) - 1) - p0 + 1;
    for (int i = tid; i < cnt; i += NT) pf_cp_async4(sPg + (buf * (BN + 4) + i) * 4, bt + p0 + i);
  };
  // Physical row of key t (n0 <= t < min(n0 + BN, lk)) of this lane, or -1 behind an invalid page id.
  auto phys_row = [&](int t, int n0, int buf) -> long long {
    if (!PAGED) return (long long)t;
    const int pid = (int)sm_u32(sPg + (buf * (BN + 4) + pdiv(t) - pdiv(n0)) * 4);
    if (pid < 0 || pid >= n_pages) return -1;
    return (long long)pid * page_size + pmod(t);
  };
  // Paged with page_size % BN == 0: every tile lies in one page (one page id per tile).
  const bool tile_in_page = PAGED && page_size % BN == 0;
  auto tile_row0 = [&](int n0, int buf) -> long long {     // physical row of key n0, or -1
    const int pid = (int)sm_u32(sPg + buf * (BN + 4) * 4);
    if (pid < 0 || pid >= n_pages) return -1;
    return (long long)pid * page_size + pmod(n0);
  };
  // Row index into external per-row qparams ([B, KV_PAD, N_KVH] or [1, P*S, N_KVH], contiguous).
  auto qp_row = [&](long long pr) -> long long { return PAGED ? pr : (long long)b * kv_pad + pr; };

  // Thread tid handles chunk lc of rows lr + i*RSTEP of every tile (RSTEP = NT / CH rows per pass).
  constexpr int RSTEP = NT / CH;
  const int lr = tid / CH, lc = tid % CH;
  auto sw_dst = [&](u32 tile, int i) -> u32 {
    const int r = lr + i * RSTEP;
    return tile + (r * D + ((lc ^ (r & 7)) << 3)) * 2;
  };

  // bf16: cp.async the key tile starting at n0 into smem tile dst; keys >= lk and keys behind an
  // invalid page become zeros. Returns true if a key < lk sits behind an invalid page (paged); K
  // loads also write the per-key validity bytes.
  auto load_kv = [&](const CT* base, long long st, u32 dst, int n0, bool is_k, int buf) -> bool {
    bool bad = false;
    if (!PAGED) {
      const int rem = lk - n0 - lr;                // row i is a key < lk iff i * RSTEP < rem
      const CT* p = base + (long long)(n0 + lr) * st + lc * 8;
      const long long step = (long long)RSTEP * st;
#pragma unroll
      for (int i = 0; i < BN / RSTEP; ++i) {
        const bool ok = i * RSTEP < rem;
        pf_cp_async16(sw_dst(dst, i), ok ? p : base, ok ? 16u : 0u);
        p += step;
      }
      return false;
    }
    if (tile_in_page) {
      const long long pr0 = tile_row0(n0, buf);
      const int rem = pr0 >= 0 ? lk - n0 - lr : 0;
      const CT* p = base + (pr0 + lr) * st + lc * 8;
      const long long step = (long long)RSTEP * st;
#pragma unroll
      for (int i = 0; i < BN / RSTEP; ++i) {
        const bool ok = i * RSTEP < rem;
        if (is_k && lc == 0) sm_st8(sF + lr + i * RSTEP, ok ? 1u : 0u);
        pf_cp_async16(sw_dst(dst, i), ok ? p : base, ok ? 16u : 0u);
        p += step;
      }
      return pr0 < 0;
    }
    int pr[BN / RSTEP];                        // physical rows (< P*S < 2^31), -1 invalid, -2 past lk
#pragma unroll
    for (int i = 0; i < BN / RSTEP; ++i) {     // page lookups first, so their latencies overlap
      const int t = n0 + lr + i * RSTEP;
      pr[i] = t < lk ? (int)phys_row(t, n0, buf) : -2;
      bad |= pr[i] == -1;
    }
#pragma unroll
    for (int i = 0; i < BN / RSTEP; ++i) {
      if (is_k && lc == 0) sm_st8(sF + lr + i * RSTEP, pr[i] >= 0 ? 1u : 0u);
      const CT* src = pr[i] >= 0 ? base + (long long)pr[i] * st + lc * 8 : base;
      pf_cp_async16(sw_dst(dst, i), src, pr[i] >= 0 ? 16u : 0u);
    }
    return bad;
  };

  // Quantized: cp.async the raw rows (4-byte words, one warp per row) and external fp8 words of the
  // tile starting at n0 into staging; rows past lk or behind an invalid page are skipped.
  auto load_raw = [&](const CT* base, long long st, u32 rbuf, u32 wbuf, const int* qpw, int n0, int buf) {
    const long long pr0 = tile_in_page ? tile_row0(n0, buf) : 0;
#pragma unroll 4
    for (int i = 0; i < BN / NW; ++i) {
      const int r = warp + i * NW;
      const int t = n0 + r;
      if (t >= lk) break;
      const long long pr = tile_in_page ? (pr0 >= 0 ? pr0 + r : -1) : phys_row(t, n0, buf);
      if (pr < 0) continue;
      const u8* src = reinterpret_cast<const u8*>(base + pr * st);
      for (int w = lane; w < rw; w += 32) pf_cp_async4(rbuf + r * rsp + w * 4, src + w * 4);
      if (qpw && lane == 0) pf_cp_async4(wbuf + r * 4, qpw + qp_row(pr) * n_kvh + kvh);
    }
  };
  // Quantized: decode the staged rows into the bf16 tile dst (exact SPEC §2.3-§2.5 values; zeros for
  // rows past lk or behind an invalid page). K also writes the validity bytes; returns "bad" as
  // load_kv does.
  auto decode = [&](u32 rbuf, u32 wbuf, float sc, u32 dst, int n0, bool is_k, int buf) -> bool {
    bool bad = false;
    const long long pr0 = tile_in_page ? tile_row0(n0, buf) : 0;
#pragma unroll
    for (int i = 0; i < BN / RSTEP; ++i) {
      const int r = lr + i * RSTEP;
      const int t = n0 + r;
      long long pr = -1;
      if (t < lk) {
        pr = tile_in_page ? (pr0 >= 0 ? pr0 + r : -1) : phys_row(t, n0, buf);
        if (pr < 0) bad = true;
      }
      if (PAGED && is_k && lc == 0) sm_st8(sF + r, pr >= 0 ? 1u : 0u);
      u32 o[4] = {0u, 0u, 0u, 0u};
      if (pr >= 0) {
        const u32 row = rbuf + r * rsp;
        if (FMT == PF_FMT_INT4) {
          const u32 wg = sm_u32(row + 4 * ((8 * lc) / (D / n_groups)));
          pf_decode8<FMT>(sm_u32(row + 4 * n_groups + 4 * lc), 0u, wg, 0.0f, o);
        } else {
          const u32 w = FMT == PF_FMT_FP8 ? sm_u32(qp_off ? row : wbuf + r * 4) : 0u;
          pf_decode8<FMT>(sm_u32(row + qp_off + 8 * lc), sm_u32(row + qp_off + 8 * lc + 4), w, sc, o);
        }
      }
      sm_st16(sw_dst(dst, i), o);
    }
    return bad;
  };

  // ---- prologue: Q tile (+ the last tile's page ids), then the last K tile
  {
    const int rem = lq - m0 - lr;
    const u16* p = a.q + ((long long)qs + m0 + lr) * a.q_st + (long long)h * a.q_sh + lc * 8;
    const long long step = (long long)RSTEP * a.q_st;
#pragma unroll
    for (int i = 0; i < BM / RSTEP; ++i) {
      const bool ok = i * RSTEP < rem;
      pf_cp_async16(sw_dst(sQ, i), ok ? p : a.q, ok ? 16u : 0u);
      p += step;
    }
  }
  if (PAGED && n_tiles > 0) prefetch_pages((n_tiles - 1) * BN, (n_tiles - 1) & 1);
  cp_async_commit();
  if (PAGED) {
    cp_async_wait<0>();
    __syncthreads();
  }
  bool k_bad = false;
  if (n_tiles > 0) {
    if (QUANT) load_raw(kbase, a.k_st, rK, sWk, qpw_k, (n_tiles - 1) * BN, (n_tiles - 1) & 1);
    else k_bad = load_kv(kbase, a.k_st, sK, (n_tiles - 1) * BN, true, (n_tiles - 1) & 1);
  }
  cp_async_commit();

  const int wrow = warp * 16 * MT;        // first row of this warp inside the block

  // ldmatrix byte offsets. Every row a thread addresses has (row & 7) == (lane & 7), and its chunk is
  // 2*kd + hi (hi = 0 or 1), so the swizzled chunk (2*kd + hi) ^ (lane & 7) equals
  // 8*(kd >> 2) + ((2*(kd & 3)) ^ y) with y = hi ^ (lane & 7): four per-thread offsets per operand,
  // everything else is a compile-time immediate.
  u32 offQ[4], offK[4], offV[4];
  {
    const int x7 = lane & 7;
    const int yq = (lane >> 4) ^ x7, yk = ((lane >> 3) & 1) ^ x7;
    const int rq = wrow + (lane & 15), rk = (lane & 7) + ((lane >> 4) << 3), rv = lane & 15;
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) {
      offQ[jj] = sQ + rq * D * 2 + (((2 * jj) ^ yq) << 4);
      offK[jj] = sK + rk * D * 2 + (((2 * jj) ^ yk) << 4);
      offV[jj] = sV + rv * D * 2 + (((2 * jj) ^ yq) << 4);
    }
  }

  float o_acc[MT][ND][4];
  float m_run[MT][2], l_run[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int nd = 0; nd < ND; ++nd)
#pragma unroll
      for (int e = 0; e < 4; ++e) o_acc[mt][nd][e] = 0.0f;
    m_run[mt][0] = m_run[mt][1] = CUKV_NEG_INF;
    l_run[mt][0] = l_run[mt][1] = 0.0f;
  }

  u32 qf[QREG ? MT : 1][QREG ? D / 16 : 1][4];
  if (QREG) {
    cp_async_wait<1>();
    __syncthreads();
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int kd = 0; kd < D / 16; ++kd)
        ldmatrix_x4(offQ[kd & 3] + mt * 16 * D * 2 + (kd >> 2) * 128, qf[mt][kd][0], qf[mt][kd][1],
                   qf[mt][kd][2], qf[mt][kd][3]);
  }

  for (int j = n_tiles - 1; j >= 0; --j) {
    const int n0 = j * BN, buf = j & 1;
    cp_async_wait<0>();
    bool any_bad;
    if (QUANT) {
      __syncthreads();
      const bool bad = decode(rK, sWk, s_k, sK, n0, true, buf);
      any_bad = __syncthreads_or(bad ? 1 : 0) != 0;
    } else {
      any_bad = PAGED ? (__syncthreads_or(k_bad ? 1 : 0) != 0) : (__syncthreads(), false);
    }
    if (QUANT) load_raw(vbase, a.v_st, rV, sWv, qpw_v, n0, buf);
    else load_kv(vbase, a.v_st, sV, n0, false, buf);
    if (PAGED && j > 0) prefetch_pages(n0 - BN, buf ^ 1);
    cp_async_commit();

    // ---- S = Q K^T
    float s[MT][NB][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nb = 0; nb < NB; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mt][nb][e] = 0.0f;
#pragma unroll
    for (int kd = 0; kd < D / 16; ++kd) {
      u32 af[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        if (QREG) {
#pragma unroll
          for (int e = 0; e < 4; ++e) af[mt][e] = qf[QREG ? mt : 0][QREG ? kd : 0][e];
        } else {
          ldmatrix_x4(offQ[kd & 3] + mt * 16 * D * 2 + (kd >> 2) * 128, af[mt][0], af[mt][1], af[mt][2],
                     af[mt][3]);
        }
      }
#pragma unroll
      for (int nb2 = 0; nb2 < NB / 2; ++nb2) {
        u32 b0, b1, b2, b3;
        ldmatrix_x4(offK[kd & 3] + nb2 * 16 * D * 2 + (kd >> 2) * 128, b0, b1, b2, b3);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma_bf16(s[mt][2 * nb2], af[mt][0], af[mt][1], af[mt][2], af[mt][3], b0, b1);
          mma_bf16(s[mt][2 * nb2 + 1], af[mt][0], af[mt][1], af[mt][2], af[mt][3], b2, b3);
        }
      }
    }

    // ---- mask: keys >= lk, the causal diagonal, keys behind invalid pages
    const bool edge = n0 + BN > lk || (causal && n0 + BN - 1 > m0 + wrow + shift);
    if (edge || any_bad) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nb = 0; nb < NB; ++nb)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int row = m0 + wrow + mt * 16 + g + ((e >> 1) << 3);
            const int key = n0 + nb * 8 + 2 * tig + (e & 1);
            bool vis = key < lk && (!causal || key <= row + shift);
            if (PAGED && any_bad && vis) vis = pf_smem[sF - sQ + (key - n0)] != 0;
            if (!vis) s[mt][nb][e] = CUKV_NEG_INF;
          }
    }

    cp_async_wait<0>();
    __syncthreads();
    if (j > 0) {
      if (QUANT) load_raw(kbase, a.k_st, rK, sWk, qpw_k, n0 - BN, buf ^ 1);
      else k_bad = load_kv(kbase, a.k_st, sK, n0 - BN, true, buf ^ 1);
    }
    cp_async_commit();

    // ---- online softmax (rows g and g + 8 of every m16 tile; a row lives in one quad)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        float mx = CUKV_NEG_INF;
#pragma unroll
        for (int nb = 0; nb < NB; ++nb) mx = fmaxf(mx, fmaxf(s[mt][nb][2 * hr], s[mt][nb][2 * hr + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(CUKV_FULL_MASK, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(CUKV_FULL_MASK, mx, 2));
        const float m_new = fmaxf(m_run[mt][hr], mx * scale_log2);
        const float m_use = m_new == CUKV_NEG_INF ? 0.0f : m_new;
        const float alpha = ex2_approx(m_run[mt][hr] - m_use);
        m_run[mt][hr] = m_new;
        float sum = 0.0f;
#pragma unroll
        for (int nb = 0; nb < NB; ++nb)
#pragma unroll
          for (int e = 2 * hr; e < 2 * hr + 2; ++e) {
            const float p = ex2_approx(__fmaf_rn(s[mt][nb][e], scale_log2, -m_use));
            s[mt][nb][e] = p;
            sum += p;
          }
        l_run[mt][hr] = l_run[mt][hr] * alpha + sum;
#pragma unroll
        for (int nd = 0; nd < ND; ++nd) {
          o_acc[mt][nd][2 * hr] *= alpha;
          o_acc[mt][nd][2 * hr + 1] *= alpha;
        }
      }

    // ---- O += P V, P rounded to bf16 A fragments
    auto pack_p = [&](int kk, u32 (&pa)[MT][4]) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        pa[mt][0] = pack_bf16x2(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        pa[mt][1] = pack_bf16x2(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        pa[mt][2] = pack_bf16x2(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        pa[mt][3] = pack_bf16x2(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
    };
    auto pv_step = [&](int kk, const u32 (&pa)[MT][4]) {
#pragma unroll
      for (int nd2 = 0; nd2 < ND / 2; ++nd2) {
        u32 b0, b1, b2, b3;
        ldmatrix_x4_trans(offV[nd2 & 3] + kk * 16 * D * 2 + (nd2 >> 2) * 128, b0, b1, b2, b3);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma_bf16(o_acc[mt][2 * nd2], pa[mt][0], pa[mt][1], pa[mt][2], pa[mt][3], b0, b1);
          mma_bf16(o_acc[mt][2 * nd2 + 1], pa[mt][0], pa[mt][1], pa[mt][2], pa[mt][3], b2, b3);
        }
      }
    };
    if (QUANT) {
      // Pack all of P first (the fp32 scores die), then decode V(j), staged during S = Q K^T.
      u32 pa[BN / 16][MT][4];
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) pack_p(kk, pa[kk]);
      decode(rV, sWv, s_v, sV, n0, false, buf);
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) pv_step(kk, pa[kk]);
    } else {
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        u32 pa[MT][4];
        pack_p(kk, pa);
        pv_step(kk, pa);
      }
    }
  }

  // ---- epilogue: O / l through the warp's rows of the Q tile, 16-byte stores; lse
  cp_async_wait<0>();
  __syncthreads();
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      float l = l_run[mt][hr];
      l += __shfl_xor_sync(CUKV_FULL_MASK, l, 1);
      l += __shfl_xor_sync(CUKV_FULL_MASK, l, 2);
      const float inv = l > 0.0f ? 1.0f / l : 0.0f;
      const int r = wrow + mt * 16 + g + hr * 8;
#pragma unroll
      for (int nd = 0; nd < ND; ++nd)
        pf_st_shared4(sQ + (pf_sw<D>(r, nd) + 2 * tig) * 2,
                      pack_bf16x2(o_acc[mt][nd][2 * hr] * inv, o_acc[mt][nd][2 * hr + 1] * inv));
      if (a.lse && tig == 0 && m0 + r < lq)
        a.lse[((long long)qs + m0 + r) * n_heads + h] =
            l > 0.0f ? (m_run[mt][hr] + lg2_approx(l)) * CUKV_LN2 : CUKV_NEG_INF;
    }
  __syncwarp();
#pragma unroll
  for (int i = 0; i < 16 * MT * CH / 32; ++i) {
    const int idx = lane + 32 * i;
    const int r = wrow + idx / CH, c = idx % CH;
    if (m0 + r < lq) {
      const uint4 v = pf_ld_shared16(sQ + pf_sw<D>(r, c) * 2);
      *reinterpret_cast<uint4*>(a.out + (((long long)qs + m0 + r) * n_heads + h) * D + c * 8) = v;
    }
  }
}
