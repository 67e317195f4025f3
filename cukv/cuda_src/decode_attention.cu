// cukv/cuda_src/decode_attention.cu: split-K decode attention straight over bf16 / FP8 / INT4 caches
// (SPEC §8.1). One query token per lane; the cache is read once per split, dequantized in registers.
//
// decode_attn<KIND, D, NT, STREAM>: one CTA per (split, KV head x head group, lane). It serves the (up to 16)
//   query heads of one head group that share a KV head, so every K/V row of the split is loaded once
//   for all of them. KIND: 0 bf16, 1 fp8 (inline words, external int32 words, or fp8_head float32
//   scales: `fp8_mode` 0/1/2), 2 int4 (G groups, `gshift` = log2(D/G)). NT (the template's NTP) = 1
//   for 5..8 query heads per KV head, 2 for 9..16 (the score and PV products then need two n-tiles of 8
//   heads), 0 (HALF) for <= 4: one n-tile whose columns n are head n & 3 and d half n >> 2 (below).
//   STREAM = 0: the split schedule above. STREAM = 1, 2 (fp8 / int4, sm_90 tensor copies): one wave of
//   persistent CTAs; warp W = k * n_items + hy is item hy (KV head x head group) of position stream k,
//   which takes the 16-key blocks [k*N/PS, (k+1)*N/PS) of all lanes' N blocks (ordered lane, block)
//   through one pipeline, across lanes, writing one partial per lane it touches (decode_attn_merge_stream
//   merges them). With a single lane the streams take its blocks in turn instead (stream k: blocks k,
//   k + PS, ..), so that all of them read one window of the cache at a time (DRAM rows used whole; still
//   one partial per stream; H100 B1 T131072 32/8 D128: int4:g4 81.4 -> 78.5 us, fp8 108.2 -> 105.9 us).
//   STREAM = 1: every warp has its own ring of per-head boxes. STREAM = 2 (`records`, 4-8 KV heads of
//   <= 16 query heads): a CTA is one stream, one warp per KV head, sharing a ring of whole token records
//   (two boxes of 16 records per stage, K and V, issued by thread 0; full / empty mbarriers), so the
//   DRAM reads are contiguous and each warp reads its head's rows in place. STREAM = 3 (int4:g4 records
//   that are whole 128-byte lines, i.e. 8 KV heads): the boxes are the block's 16 records seen as rows
//   of 128 bytes (one contiguous 16-record run per box), stored by the TMA with its 128-byte swizzle
//   (the 16-byte chunk c of line L lands at chunk c ^ (L & 7)); every shared read goes through that XOR
//   (swz_off), with each thread's offsets computed once (rows j and j + 8 share a pattern). The records
//   are then unpadded, yet the K / header reads of 8 keys hit 8 different chunks (conflict-free) and
//   the V reads are 1.56-way on average (2-way with the padded pitch). See the measurements below.
// decode_attn_merge, decode_attn_merge_stream: the log-sum-exp merge of the partials, one warp per
//   (lane, query head), or one block where a task has many partials, in a fixed order (deterministic, no
//   atomics). Launched with PDL: the stream kernels let it start at once, and it waits for their end.
//
// Memory layout read (SPEC §2, §3): row (i0, i1, h) of a cache starts at byte i0*cs0 + i1*cs1 + h*cs2;
// contiguous caches use (i0, i1) = (b, t), paged ones (0, block_tables[b, t/S]*S + t%S). External fp8
// words sit at element i0*ws0 + i1*ws1 + h*ws2 of an int32 array. A row is R bytes:
//   bf16 [2D bytes] | fp8 [scale f16, shift f16][D e4m3] or [D e4m3] | int4 [G x (scale, shift) f16][D/2].
//
// Algorithm. Each warp of the CTA owns the 16-key blocks w, w+nw, ... of the split and streams them
// through its own STAGES-deep ring of shared-memory slots with cp.async. Fast copy (`fast`, the usual
// case: every row of a head sits at the same address mod 16): 8 lanes per row, 16-byte pieces between
// the row's 16-byte boundaries and 4-byte pieces at its ends (each lane: one 16-byte piece per 128
// bytes and at most one 4-byte piece of each of its rows), so exactly the row's bytes are read and
// the row lands at its address mod 16 in its slot; whole blocks of contiguous caches walk per-lane row
// pointers (no per-row offsets through shared memory). Generic copy: uniform 16/8/4-byte pieces (or
// bytes) chosen by the host from the strides and base addresses. Rows that must not be read (past the
// split, or behind an out-of-range page id) are zero-filled, never loaded, and masked to -inf.
// Tensor copy (`fast` = 3, sm_90, contiguous quantized caches with 16-byte-aligned token records): lane
// 0 loads the block's K and V as two TMA boxes (16 rows from the 16-byte boundary at or before the row),
// completion counted on an mbarrier per stage; rows past the split are loaded (in bounds, or zero-filled
// by the TMA past the cache end), masked to -inf, and their V rows zeroed in shared memory on arrival.
// Token records 4- or 8-byte aligned only (fp8 with 1 or 2 KV heads): `kpack` (4 or 2) records form
// one 16-byte aligned box row, so a box is 16 / kpack rows holding the head's 16 rows (key j at row
// j / kpack, record j % kpack: rowK / rowV), and the split ranges start at multiples of 16 keys.
// On the H100 this is 4-10% faster than the cp.async copy (an ncu-free probe of the copy alone, with
// the arithmetic compiled out, ran the cp.async copy at 71-77% of copy bandwidth). Shared memory does
// not depend on the sequence length. Per block:
//   S^T[t, h] = K Q^T with mma.m16n8k16 (A = K: 16 key rows; B = Q^T: n-tiles of 8 heads, so with
//     4 heads per KV head half of each tile is used, not a quarter). The reduction index (d) may be
//     permuted freely as long as A and B agree, so every thread decodes a few 8-element chunks of its
//     keys g and 8+g straight from the raw row bytes into bf16 pairs (the q fragments are laid out
//     once in shared memory with the same permutation).
//   online softmax in the log2 domain (scores prescaled by softmax_scale*log2(e), exp2), fp32 sums of
//     the unrounded probabilities; the probabilities are rounded to bf16/fp16 for the P.V product.
//     A thread holds heads 2t, 2t+1 of a tile: the running max and the rescale factors are local
//     after a max over the 8 lanes of its column; the sums are per-thread partials reduced at the end.
//   O^T[d, h] += V^T P^T with mma (A = V^T: 16 d rows x 16 keys, B = P^T: the 8x8 tiles of P the
//     thread holds, transposed in registers with movmatrix, so P never goes through shared memory).
//   HALF (<= 4 heads): the q fragments repeat the heads in columns 4-7 and the score rows are permuted
//     (mma row 2i = key i, 2i+1 = key i+4 of a half block), so the transposed P tile of a thread holds
//     keys t and t+4. A P.V product then covers 8 keys, reduction index 2i + h (key i, d half h), with
//     B = P where h == n >> 2, else 0 (one byte permute): C[d][n] = sum_i V[i][d | half n >> 2] P[i][n & 3].
//     Half the accumulators (KS/2 tiles), and an A word is two positions of one key as decoded (int4,
//     bf16) or one cvt of two adjacent e4m3 codes (fp8): no pairing permutes. H100, 32/8 heads D128:
//     int4:g4 -2.5-4%, fp8 -0-0.6%, bf16 -0-0.5%.
// At the end the warps of a CTA are merged through shared memory; a single split writes out/lse
// directly, otherwise the unnormalised a, m, l of the split go to float32 partials for the merge.
//
// Measured on the H100 and not kept (same-run A/B at the bench shapes, 32/8 heads, D128): the last warp
// done with a records stage issuing the next copies into it, instead of thread 0 waiting for the stage
// (int4:g4 +3%, fp8 +0.7%); lazy rescaling, the running max moved only where a score exceeds it by 8 in
// log2 units (fp8 +1.3%, int4 unchanged); a third records stage (int4 +3-4% at B64 / B128; fp8 -1.5% at
// B1 but +1-2% at B64 / B16); int4 V decoded as key pairs, 16 fewer byte permutes a block (+0.3-0.8 us:
// int4 is not bound by its instruction count, see ncu: 66% issue, 1.4 eligible warps a scheduler); bf16
// through tensor copies (unchanged, 93-95% of copy either way); 16 or 24 merge rows in flight for D128
// (int4 B16 -2 us, B128 +1.5 us). With HALF, int4:g4 records: three CTAs per SM (80 registers, no
// spills) 150-155 us vs 142-146 (and 80 registers at two CTAs, so that a merge block fits beside them:
// 151-155 us; the 80-register code is the slower part); two K accumulator chains (unchanged); a third
// stage again (ncu: kernel -0.6%, but the merge's blocks no longer fit beside the ring: call +3%);
// streams taken in interleaved pairs of blocks (DRAM-side, with the arithmetic compiled out: <= 1 us).
// With the arithmetic compiled out the int4:g4 records ring alone takes 133.9 / 133.2 / 136.5 / 74.3 us
// (B64 / B16 / B128 / B1; 1 CTA per SM: 130.5 / 129.5 / 134.6 / 70.4), against 142 / 142.5 / 145.5 /
// 80.5 us with it: the memory pipeline, not the arithmetic, sets most of the int4 time. Its boxes matter:
// the 16 records of a block loaded as 5 rows of 2048 bytes (the same bytes, contiguous) take 129.2 /
// 127.9 / 132.1 / 72.6 us, but the unpadded 640-byte record pitch then puts K word reads 8-way and V
// reads 4-way on one bank (full kernel 178-181 us); 656-byte rows read in bounds (an overlapping-stride
// map, no zero fill) gain nothing. So a faster int4 ring needs wide boxes and conflict-free reads of
// unpadded records: STREAM = 3 (the swizzled lines) is that ring. Same run, int4:g4 B64 / B16 / B128 /
// B1 (with the single-lane turns), us: memory only (arithmetic compiled out) 128.5 / 127.4 / 131.5 /
// 70.8 against 133.9 / 132.8 / 136.3 / 72.8 padded; arithmetic only (no copies issued) 124.6 / 126.1 /
// 127.3 / 70.1 against 126.9 / 127.6 / 128.3 / 70.6; whole calls 140.1 / 141.7 / 143.3 / 77.5 against
// 141.7 / 143.5 / 145.9 / 78.5. So int4 is bound by memory and arithmetic alike (each alone ~125-130 us
// at the large shapes), and the call costs ~12 us more than either. With the decode kernel a programmatic
// dependent launch of the previous call's merge (attention_decode.run), bench: 136.9 / 135.8 / 139.8 /
// 75.7 us, 0.390 / 0.393 / 0.396 / 0.417x SDPA. Then the tensor copies with an L2 evict_first policy
// (tma_load_3d; the cache is read once a call) and the one-round-trip WIDE merge (merge_wide): 128.8 /
// 129.3 / 131.2 / 71.7 us, 0.367 / 0.375 / 0.372 / 0.395x SDPA (fp8 206.2 -> 197.5 us at B64).
// A %globaltimer timeline of back-to-back B1 int4:g4 calls (before those two): the CTAs of one SM do
// not finish together: the one placed first (lower index) leaves ~7.4 us before its neighbour (the two
// are given equal blocks; per-SM last exits lie within 2.6 us), so the last ~7 us of the kernel run one
// CTA an SM; then ~0.7 us to the merge's wait, 5.3 us of merge (4.3 with merge_wide, most of it the
// first loads of the partials, whatever their pattern or L2 hint), ~0.7 us to the next call's wait.
// Measured and not kept (B1 T131072 unless noted): two records streams in one CTA of 16 warps sharing
// the stages' empty barriers, so they move in step (bit-identical output; 79.6 against 76.5 us, B64
// 137.2 / 137.9; with three stages 80.9); turns weighted towards the CTAs placed first (C + 1 blocks
// against C each cycle, C = 3..12: 79.9-87.3 against 76.8 us); the merge inside the decode kernel after
// a grid barrier (cooperative launch 78.7, without the attribute 77.7, against 76.6 us; fp8 +2.5 us);
// the partials stored with an L2 evict_last policy (CUKV_DA_KEEP_PARTS: 72.9 against 71.8 us); the
// L2 promotion at 0 / 64 / 256 bytes (within 0.3 us). Computing the XOR at every read
// (swizzle as a run-time flag of STREAM = 2, or per read) made the arithmetic 8-10% slower (147-159 us);
// one 640-byte bulk copy per record (cp.async.bulk, padded rows) 189 us; a 1-D bulk-copy ring alone
// (no tensor map) reads 671 MB at 3035-3134 GB/s on the same H100, LDG.128 at 3077-3159 GB/s.
// Also not kept with STREAM = 3: the merge giving a warp all 4 heads of a slot at B64 / B128 (+1.5 /
// -0.1 us); one V-zeroing loop for the records and tensor-copy paths (int4 +0.2-0.9 us: its registers
// moved, 126 against 122); the L2 promotion at 0 / 256 bytes (within 0.5 us); one CTA per SM (163 us).
//
// Numerics. The math definition uses the dequantized bf16 values k^, v^ of SPEC §2.3-§2.5; the
// result must meet SPEC §11.2 against a float64 reference over them.
//   K: dequantized exactly (so scores, lse and the raw `dots` carry only fp32 accumulation error):
//     fp8      RN_bf16(RN_f32(E4M3^-1(q)*scale + shift))   (exact product, one fp32 rounding: one fma)
//     fp8_head RN_bf16(RN_f32(E4M3^-1(q)*s))               (an fma with -0 as addend is that product)
//     int4     RN_bf16(RN_f16(q*scale + shift))            (one f16x2 fma)
//   e4m3 -> f16 uses the sm_89+ cvt.rn.f16x2.e4m3x2 (exact), with common.cuh's integer decoder below.
//   V (bf16 mma for bf16 caches, fp16 mma otherwise; the probabilities are rounded to that type):
//     fp8: the affine is folded algebraically, O = sum_t p_t (scale_t c_t + shift_t)
//       = 2^(e-127) * sum_t [p_t scale_t 2^(127-e)] c_t + sum_t p_t shift_t, with c_t the exact e4m3
//       values as fp16 operands, the bracket rounded to fp16 (e: the largest biased fp32 exponent of
//       any V scale seen so far by the warp, so the bracket is < 2; the accumulator is rescaled by
//       2^(e_old - e_new) when e grows) and the shift sum kept in fp32 per head. The bf16 rounding of
//       v^ is not applied: v differs from v^ by at most half a bf16 ulp (2^-8 relative), inside §11.2.
//     int4: the fp16 values RN_f16(q*scale + shift) (v^ before its final bf16 rounding).
#include "mma.cuh"

#define KIND_BF16 0
#define KIND_FP8 1
#define KIND_INT4 2
// Tuning knobs (H100 sweeps; attention_decode._STAGES must agree with the stage count): pipeline
// depth of the quantized kinds (2 frees shared memory for more CTAs per SM), and the CTAs per SM the
// int4 / fp8 kernels' register budget is cut for (4: <= 128 registers; only where D*NT <= 128).
#ifndef CUKV_DA_STAGES_Q
#define CUKV_DA_STAGES_Q 2
#endif
#ifndef CUKV_DA_KEEP_PARTS
#define CUKV_DA_KEEP_PARTS 0
#endif
#ifndef CUKV_DA_EVICT_FIRST
#define CUKV_DA_EVICT_FIRST 1
#endif
#ifndef CUKV_DA_STAGES_REC
#define CUKV_DA_STAGES_REC 2
#endif
#ifndef CUKV_DA_MINB
#define CUKV_DA_MINB 4
#endif
#ifndef CUKV_DA_MINB_FP8
#define CUKV_DA_MINB_FP8 3
#endif

// ------------------------------------------------------------------------------------ PTX helpers

// cp.async of W bytes to shared address `dst`; `skip`: write zeros, read nothing (ignore-src).
template <int W>
__device__ __forceinline__ void cp_async(u32 dst, const void* src, bool skip) {
  const int z = skip;
  if (W == 16)
    asm volatile("{\n .reg .pred q;\n setp.ne.b32 q, %2, 0;\n cp.async.cg.shared.global [%0], [%1], 16, q;\n}\n"
                 ::"r"(dst), "l"(src), "r"(z));
  else
    asm volatile("{\n .reg .pred q;\n setp.ne.b32 q, %2, 0;\n cp.async.ca.shared.global [%0], [%1], %3, q;\n}\n"
                 ::"r"(dst), "l"(src), "r"(z), "n"(W));
}

__device__ __forceinline__ u32 hsub2(u32 a, u32 b) {
  u32 r;
  asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  return r;
}
__device__ __forceinline__ u32 hfma2(u32 a, u32 b, u32 c) {
  u32 r;
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  return r;
}

// a * (lo half of sz, twice) + (hi half of sz, twice) in f16x2: the halves are broadcast by operand
// selectors of the fma (no byte permutes).
__device__ __forceinline__ u32 hfma2_bcast(u32 a, u32 sz) {
  u32 r;
  asm("{\n .reg .b16 lo, hi;\n .reg .b32 s2, z2;\n mov.b32 {lo, hi}, %2;\n mov.b32 s2, {lo, lo};\n"
      " mov.b32 z2, {hi, hi};\n fma.rn.f16x2 %0, %1, s2, z2;\n}\n" : "=r"(r) : "r"(a), "r"(sz));
  return r;
}

// The codes in bits 16-31 of `w`, like e4m3x2_to_f16x2(w >> 16) (sm_89+: the cvt reads the high
// half directly, no shift).
__device__ __forceinline__ u32 e4m3x2_hi_to_f16x2(u32 w);

// Two e4m3 codes (bits 0-7 and 8-15 of `two`) -> fp16x2 of their exact values (every e4m3fn value,
// NaN included, is an fp16 value).
__device__ __forceinline__ u32 e4m3x2_to_f16x2(u32 two) {
#if __CUDA_ARCH__ >= 890
  u32 h;
  const unsigned short in = (unsigned short)(two & 0xffffu);
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h) : "h"(in));
  return h;
#else
  return (u32)f32_to_f16(e4m3_to_f32(two & 0xffu)) | ((u32)f32_to_f16(e4m3_to_f32((two >> 8) & 0xffu)) << 16);
#endif
}

__device__ __forceinline__ u32 e4m3x2_hi_to_f16x2(u32 w) {
#if __CUDA_ARCH__ >= 890
  u32 h;
  asm("{\n .reg .b16 lo, hi;\n mov.b32 {lo, hi}, %1;\n cvt.rn.f16x2.e4m3x2 %0, hi;\n}\n" : "=r"(h) : "r"(w));
  return h;
#else
  return e4m3x2_to_f16x2(w >> 16);
#endif
}

// (a & b) | c in one instruction (the compiler splits it when b and c are both immediates).
__device__ __forceinline__ u32 and_or(u32 a, u32 b, u32 c) {
  u32 r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  return r;
}

// Hopper tensor copies (sm_90+, `fast` = 3): one lane loads a whole 16-key block of one head (a box of
// 16 rows of the [B, T, record bytes] cache view, from the 16-byte boundary at or before the row to
// past its end: the TMA engine needs 16-byte-aligned box starts) into shared memory, and its
// completion is counted in bytes on an mbarrier per pipeline stage.
struct __align__(64) Tmap { u64 w[16]; };   // a CUtensorMap, encoded on the host
#if __CUDA_ARCH__ >= 900
#define CUKV_DA_TMA 1
__device__ __forceinline__ void mbar_init(u32 bar, u32 count = 1) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(u32 bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_inval(u32 bar) {
  asm volatile("mbarrier.inval.shared::cta.b64 [%0];" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(u32 bar, u32 bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
  asm volatile("{\n .reg .pred p;\n WAIT_%=:\n mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
               " @!p bra WAIT_%=;\n}\n" ::"r"(bar), "r"(parity) : "memory");
}
// The cache is read once a call: its lines go into L2 first in line for eviction, so that the partials
// the merge reads next are still there (CUKV_DA_EVICT_FIRST).
__device__ __forceinline__ void tma_load_3d(u32 dst, const Tmap* map, int c0, int c1, int c2, u32 bar) {
#if CUKV_DA_EVICT_FIRST
  u64 pol;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
  asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.L2::cache_hint"
               " [%0], [%1, {%2, %3, %4}], [%5], %6;"
               ::"r"(dst), "l"(reinterpret_cast<u64>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(bar), "l"(pol) : "memory");
#else
  asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];"
               ::"r"(dst), "l"(reinterpret_cast<u64>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(bar) : "memory");
#endif
}
#else
#define CUKV_DA_TMA 0
#endif

// A partial's store; with CUKV_DA_KEEP_PARTS kept in L2 (evict_last) for the merge that reads it next
// (off: measured 1 us slower at B1, see the header).
__device__ __forceinline__ void st_part(float* p, float v) {
#if CUKV_DA_KEEP_PARTS && __CUDA_ARCH__ >= 800
  u64 pol;
  asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(pol));
  asm volatile("st.global.L2::cache_hint.f32 [%0], %1, %2;" ::"l"(p), "f"(v), "l"(pol) : "memory");
#else
  *p = v;
#endif
}

// Programmatic dependent launch (sm_90+; no-ops in a kernel launched without it): the decode kernel
// lets its merge launch at once (pdl_trigger), the merge waits for the decode grid to complete and its
// writes to be visible before it reads the partials (pdl_wait). The merge in turn lets the next call's
// decode kernel launch (the stream schedule's, where its wave fills every SM), which waits for the
// kernel before it before it touches global memory.
__device__ __forceinline__ void pdl_trigger() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// ------------------------------------------------------------------------------------ formats
template <int KIND, int D> struct Geo {
  static constexpr int CB = KIND == KIND_BF16 ? 16 : (KIND == KIND_FP8 ? 8 : 4);  // bytes of 8 elements
  // K: each thread covers D/4 elements of a key, in "units" of CPU consecutive chunks (16 or 8 bytes).
  static constexpr int CPU = KIND == KIND_BF16 ? 1 : (KIND == KIND_FP8 ? 2 : (D / 32 < 4 ? D / 32 : 4));
  static constexpr int UB = CB * CPU;
  static constexpr int KCH = D / 32;   // K chunks per thread and key
  static constexpr int KU = KCH / CPU; // K units per thread and key
  static constexpr int KS = D / 16;    // QK k-steps = PV m-tiles
  static constexpr int VCH = D / 64;   // V chunks per thread and key
  static constexpr int STAGES = KIND == KIND_BF16 ? 3 : CUKV_DA_STAGES_Q;
  // fast copy: 16-byte pieces per lane and row (8 lanes per row; rows of at most RMAX bytes)
  static constexpr int RMAX = KIND == KIND_BF16 ? 2 * D : (KIND == KIND_FP8 ? D + 4 : D / 2 + 32);
  static constexpr int NMID = ((RMAX >> 4) + 7) >> 3;
};

// Position p (0..7) of a decoded chunk -> element offset in the chunk. Decoded word w holds positions
// 2w (low half) and 2w+1 (high half). INT4 decodes nibbles (w, w+4) into word w (cheaper extraction).
template <int KIND> __host__ __device__ constexpr int chunk_perm(int p) {
  return KIND == KIND_INT4 ? ((p & 1) ? 4 + (p >> 1) : (p >> 1)) : p;
}

// K operand layout. bf16: thread tt of a key reads the 16-byte units u*4 + tt (LDS.128). Quantized
// rows sit at any 4-byte offset, so they are read as words, interleaved across the 4 threads of a
// key: thread tt's j-th word of unit group u is word u*UB + tt + 4j of the row payload (with a row
// slot of an odd number of 16-byte lines, the 32 lanes of one LDS.32 hit 32 banks). A chunk (8
// elements) is CB/4 consecutive j. k_elem gives the element of position p (0..7) of the thread's
// local chunk lc; k_word gives the payload word of its first word (the int4 group lookup).
template <int KIND, int D> __host__ __device__ constexpr int k_word(int lc, int tt) {
  return KIND == KIND_BF16 ? 0 : (lc / Geo<KIND, D>::CPU) * Geo<KIND, D>::UB + tt +
                                   4 * ((lc % Geo<KIND, D>::CPU) * (Geo<KIND, D>::CB / 4));
}
template <int KIND, int D> __host__ __device__ constexpr int k_elem(int lc, int tt, int p) {
  return KIND == KIND_BF16
             ? 8 * ((lc / Geo<KIND, D>::CPU) * 4 * Geo<KIND, D>::CPU + tt * Geo<KIND, D>::CPU + lc % Geo<KIND, D>::CPU) + p
         : KIND == KIND_FP8 ? 4 * (k_word<KIND, D>(lc, tt) + 4 * (p >> 2)) + (p & 3)
                            : 8 * k_word<KIND, D>(lc, tt) + chunk_perm<KIND>(p);
}

// A 16-key block of the stream schedule: keys [t0, t0 + 16) of lane b, item hy (KV head x head group),
// whose keys end at `end`.
struct Cursor {
  int b, hy, t0, end;
};

// A byte offset from a 1024-byte aligned shared-memory base, where a tensor copy with the 128-byte
// swizzle put it: the 16-byte chunk index within each 128-byte line XORed with the line index mod 8.
__device__ __forceinline__ u32 swz_off(u32 o) { return o ^ ((o >> 3) & 0x70u); }

// Per-row dequantization parameters.
struct RowQ {
  float s, z;        // fp8: scale, shift (fp8_head: s, -0)
  const u8* hdr;     // int4: the row's qparam words (shared memory)
};

// Decoding is split in two stages so that V can pair values of two keys without extra permutes:
//   pre_chunk: 8 raw elements -> 4 fp16x2 words P[k] holding positions 2k (low) and 2k+1 (high):
//     fp8: the exact e4m3 values; int4: RN_f16(q*scale + shift); bf16: the raw bf16 pairs.
//   fin: the fp32 value whose RN_bf16 is the dequantized value (fp8: one fma with scale, shift).
// pack_chunk gives the 4 bf16x2 words of one key (K operand). ck: chunk index (int4 group).
template <int KIND, int D>
__device__ __forceinline__ void pre_chunk(const u32* raw, int ck, const RowQ& q, int gshift, u32 (&P)[4]) {
  if (KIND == KIND_BF16) {
#pragma unroll
    for (int k = 0; k < 4; ++k) P[k] = raw[k];
  } else if (KIND == KIND_FP8) {
#pragma unroll
    for (int k = 0; k < 4; ++k) P[k] = (k & 1) ? e4m3x2_hi_to_f16x2(raw[k >> 1]) : e4m3x2_to_f16x2(raw[k >> 1]);
  } else {
    const u32 qw = *reinterpret_cast<const u32*>(q.hdr + 4 * ((ck << 3) >> gshift));
    // Word k holds nibbles (k, k+4) as fp16 1024 + q (k even) or 1024 + 16q (k odd); both give q
    // exactly: (h - 1024) and (h/16 - 64). Then one fp16 fma: RN_f16(q*scale + shift).
    const u32 mlo = 0x000f000fu, mhi = 0x00f000f0u, magic = 0x64006400u;
    const u32 r = raw[0], y = __byte_perm(r, 0u, 0x4341);    // y: bytes 1 and 3 of r in bytes 0, 2
    const u32 qv[4] = {hsub2(and_or(r, mlo, magic), magic), hfma2(and_or(r, mhi, magic), 0x2c002c00u, 0xd400d400u),
                       hsub2(and_or(y, mlo, magic), magic), hfma2(and_or(y, mhi, magic), 0x2c002c00u, 0xd400d400u)};
#pragma unroll
    for (int k = 0; k < 4; ++k) P[k] = hfma2_bcast(qv[k], qw);
  }
}

template <int KIND>
__device__ __forceinline__ float fin(u32 pw, int hi, const RowQ& q) {
  const float v = f16_to_f32((u16)(hi ? pw >> 16 : pw & 0xffffu));
  return KIND == KIND_FP8 ? __fmaf_rn(v, q.s, q.z) : v;
}

template <int KIND>
__device__ __forceinline__ void pack_chunk(const u32 (&P)[4], const RowQ& q, u32 (&w)[4]) {
#pragma unroll
  for (int k = 0; k < 4; ++k)
    w[k] = KIND == KIND_BF16 ? P[k] : pack_bf16x2(fin<KIND>(P[k], 0, q), fin<KIND>(P[k], 1, q));
}

// int4 K: the fp16 pairs P0 (key g) and P1 (key 8+g) of a chunk -> bf16 pairs W0, W1, exactly
// RN_bf16 of each fp16 value. An identity product per word pair widens it to fp32 on the tensor cores
// (mma.m16n8k8, A = the pair's 16 x 8 fragment, B = I: one product of the value and 1.0, the rest exact
// zeros; the C layout is the A layout), then one cvt packs two values: 8 HMMA + 32 cvt-packs per 64
// elements instead of 64 f16 -> f32 converts and 32 packs.
__device__ __forceinline__ void widen_int4(const u32 (&P0)[4], const u32 (&P1)[4], u32 eye, u32 (&W0)[4],
                                           u32 (&W1)[4]) {
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    float c0 = 0.0f, c1 = 0.0f, c2 = 0.0f, c3 = 0.0f;
    asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, {%0, %1, %2, %3};\n"
        : "+f"(c0), "+f"(c1), "+f"(c2), "+f"(c3)
        : "r"(P0[k]), "r"(P1[k]), "r"(eye));
    W0[k] = pack_bf16x2(c0, c1);
    W1[k] = pack_bf16x2(c2, c3);
  }
}

// NB raw bytes at p (shared memory) into words: one 16-byte load for bf16 rows (16-aligned), 4-byte
// loads otherwise (quantized rows sit at any 4-byte offset of their slot, see the copy below).
template <int KIND, int NB>
__device__ __forceinline__ void lds(const u8* p, u32 (&r)[NB / 4]) {
  if (KIND == KIND_BF16 && NB == 16) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    r[0] = u.x; r[1] = u.y; r[2] = u.z; r[3] = u.w;
  } else {
#pragma unroll
    for (int k = 0; k < NB / 4; ++k) r[k] = reinterpret_cast<const u32*>(p)[k];
  }
}

// Lane bb's key count: seqlens[bb] clamped to [0, capacity] (the host validates the lengths; the clamp
// keeps any input in bounds). Its 16-key blocks: (lane_keys + 15) >> 4.
__device__ __forceinline__ int lane_keys(const int* __restrict__ seqlens, int bb, int capacity) {
  const int n = seqlens[bb];
  return n < 0 ? 0 : (n > capacity ? capacity : n);
}

// (lo half of a, lo half of b) or (hi half of a, hi half of b).
__device__ __forceinline__ u32 pair_sel(u32 a, u32 b, int hi) {
  return __byte_perm(a, b, hi ? 0x7632 : 0x5410);
}

// ------------------------------------------------------------------------------------ the kernel
template <int KIND, int D, int NTP, int STREAM>
__global__ void __launch_bounds__(STREAM >= 2 ? 256 : 128,
                                  D * (NTP ? NTP : 1) > 128 ? 1
                                  : STREAM >= 2 ? 2
                                  : KIND == KIND_INT4 ? CUKV_DA_MINB : KIND == KIND_FP8 ? CUKV_DA_MINB_FP8 : 1)
    decode_attn(
    const u16* __restrict__ q, const u8* __restrict__ ck, const u8* __restrict__ cv,
    const void* __restrict__ qpk, const void* __restrict__ qpv, const int* __restrict__ block_tables,
    int max_pages, int page_size, int n_pages, const int* __restrict__ seqlens, int n_heads, int n_kv,
    int capacity, i64 cs0, i64 cs1, i64 cs2, i64 ws0, i64 ws1, i64 ws2, int R, int fp8_mode, int gshift,
    float scale_log2, int num_splits, int copy_w, int fast, int pad, int hdr, int sK, int sV, int stage_bytes,
    int warp_bytes, int head_major, u16* __restrict__ out, float* __restrict__ lse, float* __restrict__ part_a,
    float* __restrict__ part_ml, float* __restrict__ dots, int dots_cap, int n_lanes, int kpack, int split_align,
    const __grid_constant__ Tmap tmk, const __grid_constant__ Tmap tmv) {
  typedef Geo<KIND, D> G_;
  // NTP = 0 (HALF, <= 4 query heads a KV head, every kind): one head tile whose columns n are head
  // n & 3 and d half n >> 2 of the P.V product (see there), so o holds KS / 2 m-tiles, not KS.
  constexpr bool HALF = NTP == 0;
  constexpr int NT = HALF ? 1 : NTP, OT = HALF ? G_::KS / 2 : G_::KS;
  // STREAM 2 / 3: records; 3 (int4:g4, token records of whole 128-byte lines): the boxes are those
  // lines with the TMA's 128-byte swizzle, so the reads are contiguous and the records unpadded (swz_off)
  constexpr bool REC = STREAM >= 2, SW = STREAM == 3 && KIND == KIND_INT4;
  constexpr int KS = G_::KS, STAGES = REC ? CUKV_DA_STAGES_REC : G_::STAGES;
  // (launched with PDL: the kernel before it on the stream may still run; nothing global is touched
  // before it has completed and its writes are visible)
  pdl_wait();
  if (STREAM) pdl_trigger();   // one wave: the merge's blocks may take the SMs' spare slots now
  constexpr bool FOLD = KIND == KIND_FP8;   // V scale/shift folded into P / a per-head fp32 sum
  extern __shared__ __align__(16) u8 smem[];
  const u32 smem_s = smem_u32(smem);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  const int g = lane >> 2, tid = lane & 3;
  // the query heads of this thread's score / output columns: 8*hh + hb + (0, 1); HALF: threads tid and
  // tid + 2 hold the same heads (their d halves differ), the first of them writes m and l
  const int hb = HALF ? 2 * (tid & 1) : 2 * tid;
  // the keys of this thread's score rows: kg and 8 + kg (HALF: mma row 2i is key i, row 2i + 1 key
  // i + 4, so that the transposed probabilities hold keys t and t + 4, see the P.V product)
  const int kg = HALF ? (g >> 1) + 4 * (g & 1) : g;
  const bool ml_w = !HALF || tid < 2;
  const int r = n_heads / n_kv, n_hg = (r + 15) >> 4, n_items = n_kv * n_hg;
  auto lane_len = [&](int bb) { return lane_keys(seqlens, bb, capacity); };
  // the item (lane b, KV head x head group hy) served: query heads h0 .. h0 + nh - 1, keys [start, end)
  int b, hy, kvh, h0, nh, start, end;
  auto set_item = [&](int b_, int hy_) {
    b = b_;
    hy = hy_;
    kvh = hy / n_hg;
    const int hg = hy - kvh * n_hg;
    h0 = kvh * r + hg * 16;
    nh = min(16, r - hg * 16);
  };
  int my_n;                // 16-key blocks this warp serves
  int t_step = 16;         // stream: keys between a warp's blocks (wave: 16 * PS)
  Cursor cc{0, 0, 0, 0};   // stream: the block computed next
  i64 stream_k = 0;        // stream: the position stream of this warp
  if (!STREAM) {
    // grid: (splits, KV heads x head groups, lanes), or heads first with `head_major`
    const int split = head_major ? blockIdx.y : blockIdx.x;
    set_item(blockIdx.z, head_major ? blockIdx.x : blockIdx.y);
    const int n = lane_len(b);
    int t_per = n > 0 ? (int)(((i64)n + num_splits - 1) / num_splits) : 0;
    // split_align 16 (partials not returned): splits start at multiples of 16 keys, whatever the cache
    // layout (tensor copies of kpack > 1 records a box row need it; the same bytes for every layout)
    if (split_align > 1) t_per = (int)min(((i64)t_per + split_align - 1) / split_align * split_align, (i64)n);
    start = (int)min((i64)split * t_per, (i64)n);
    end = (int)min((i64)start + t_per, (i64)n);
    const int nblk = (end - start + 15) >> 4;
    my_n = nblk > warp ? (nblk - warp + nw - 1) / nw : 0;
  } else {
    // stream: the warps of the grid form PS = min(num_splits, N) position streams of n_items
    // warps; warp W = k * n_items + hy serves item hy (KV head x head group) of the 16-key blocks
    // [k*N/PS, (k+1)*N/PS) of the N blocks of all lanes, ordered (lane, block). The n_items warps of a
    // stream read the same token records at about the same time (DRAM rows are used whole).
    i64* red = reinterpret_cast<i64*>(smem);   // scratch before the q fragments: sums, then per warp x b ex
    i64* const sx = red + 32, *const sb = red + 64, *const se = red + 96;   // (nw <= 32)
    i64 tot = 0;
    for (int bb = threadIdx.x; bb < n_lanes; bb += blockDim.x) tot += (lane_len(bb) + 15) >> 4;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) tot += __shfl_xor_sync(CUKV_FULL_MASK, tot, off);
    if (lane == 0) red[warp] = tot;
    __syncthreads();
    i64 N = 0;
    for (int w = 0; w < nw; ++w) N += red[w];
    const i64 W = (i64)blockIdx.x * nw + warp, k = W / n_items;
    const i64 PS = min((i64)num_splits, N);   // num_splits: the stream count
    const bool wave = n_lanes == 1;
    const i64 xb = wave ? (k < PS ? k : N) : (k < PS ? k * N / PS : N);
    my_n = k < PS ? (wave ? (int)((N - k + PS - 1) / PS) : (int)((k + 1) * N / PS - xb)) : 0;
    if (wave) t_step = 16 * (int)PS;
    stream_k = k;
    __syncthreads();
    if (lane == 0) {
      sx[warp] = xb;
      sb[warp] = -1;
    }
    // the lane holding block xb: an exclusive scan of the lanes' block counts, blockDim.x at a time
    i64 base = 0;
    for (int c0 = 0; c0 < n_lanes; c0 += blockDim.x) {
      const int bb = c0 + threadIdx.x;
      const i64 v = bb < n_lanes ? (lane_len(bb) + 15) >> 4 : 0;
      i64 incl = v;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const i64 t = __shfl_up_sync(CUKV_FULL_MASK, incl, off);
        if (lane >= off) incl += t;
      }
      if (lane == 31) red[warp] = incl;
      __syncthreads();
      i64 pre = base, all = base;
      for (int w = 0; w < nw; ++w) {
        pre += w < warp ? red[w] : 0;
        all += red[w];
      }
      const i64 ex = pre + incl - v;
      for (int w = 0; w < nw; ++w)
        if (v > 0 && ex <= sx[w] && sx[w] < ex + v) {
          sb[w] = bb;
          se[w] = ex;
        }
      base = all;
      __syncthreads();
    }
    const int b0 = (int)sb[warp];
    const int hy0 = (int)(W - k * n_items);
    if (my_n > 0 && b0 >= 0) {
      set_item(b0, hy0);
      cc = Cursor{b0, hy0, 16 * (int)(xb - se[warp]), lane_len(b0)};
    } else {
      my_n = 0;
      set_item(0, hy0);
    }
    start = 0;
    end = cc.end;
    __syncthreads();   // the scratch is reused by the q fragments
  }

  // ---- q fragments (A operand of S = Q K^T), in the K chunk permutation: shared by every warp of the
  // CTA, or (stream) one set per warp, reloaded when the warp moves to another item.
  uint4* const qf = reinterpret_cast<uint4*>(smem) + (STREAM ? warp * KS * 32 : 0);
  auto load_q = [&](int i0, int step) {
    for (int i = i0; i < KS * 32; i += step) {
      const int ks = i >> 5, ln = i & 31, gg = ln >> 2, tt = ln & 3;
      const int lc = ks >> 1;
      u32 a[4];
#pragma unroll
      for (int sp = 0; sp < 2; ++sp) {
        const int wd = ((ks & 1) << 1) | sp;
        const int e0 = k_elem<KIND, D>(lc, tt, 2 * wd), e1 = k_elem<KIND, D>(lc, tt, 2 * wd + 1);
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int row = HALF ? (gg & 3) : gg + 8 * half;   // (HALF: column gg is head gg & 3)
          u32 v = 0;
          if (row < nh) {
            const u16* qr = q + ((i64)b * n_heads + h0 + row) * D;
            v = (u32)qr[e0] | ((u32)qr[e1] << 16);
          }
          a[sp * 2 + half] = v;   // a0 (row g, slots 2t..), a1 (row g+8), a2 (row g, slots 2t+8..), a3
        }
      }
      qf[i] = make_uint4(a[0], a[1], a[2], a[3]);
    }
  };
  float hs_k = 0.0f, hs_v = 0.0f;   // fp8_head scales of the item
  auto load_hs = [&]() {
    if (KIND == KIND_FP8 && fp8_mode == 2) {
      hs_k = reinterpret_cast<const float*>(qpk)[(i64)b * n_kv + kvh];
      hs_v = reinterpret_cast<const float*>(qpv)[(i64)b * n_kv + kvh];
    }
  };

  // ---- this warp's pipeline
  // (records: one ring for the CTA, STREAM >= 2; its full / empty mbarriers after the last stage)
  u8* wbase = smem + (STREAM ? nw : 1) * KS * 32 * 16 + (REC ? 0 : warp * warp_bytes);
  const u32 rec_bar = smem_s + (u32)(wbase + STAGES * stage_bytes - smem);
  i64* offs = reinterpret_cast<i64*>(wbase + STAGES * stage_bytes);   // [16] row bytes, [16] words
  u32* masks = reinterpret_cast<u32*>(offs + 32);                      // [STAGES]
  // tensor copies (fast == 3): one mbarrier per stage after the masks, and a phase bit per stage
  const u32 bar_s = smem_s + (u32)(reinterpret_cast<u8*>(masks) - smem) + 16;
  u32 phase = 0;
#if CUKV_DA_TMA
  if (REC) {
    if (threadIdx.x == 0) {
#pragma unroll
      for (int s = 0; s < STAGES; ++s) {
        mbar_init(rec_bar + 8 * s);                        // full: the tensor copies' bytes
        mbar_init(rec_bar + 8 * (STAGES + s), (u32)nw);    // empty: one arrival per warp
      }
      asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
  } else if (fast == 3 && lane == 0) {
#pragma unroll
    for (int s = 0; s < STAGES; ++s) mbar_init(bar_s + 8 * s);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
#endif
  // Row placement in its slot: the generic copy puts a row at `pad` (payload 16-aligned); the fast copy
  // puts it at its global address mod 16 (delta), so that 16-byte pieces line up on both sides.
  int pad_k = pad, pad_v = pad;
  // fast copy: lane `lip` of a row copies its 16-byte pieces lip, lip+8, .. (between the row's
  // 16-byte boundaries, at mo[a] + 128 j) and at most one 4-byte piece (so[a]: the head pieces
  // before the first boundary, then the tail pieces; -1: none). a = 0: K, 1: V.
  const int lip = lane & 7, kr = lane >> 3;
  int mo[2] = {0, 0}, so[2] = {-1, -1}, nm[2] = {0, 0};
  if (fast) {
#pragma unroll
    for (int a = 0; a < 2; ++a) {
      const int delta = (int)((reinterpret_cast<u64>(a ? cv : ck) + (u64)((i64)kvh * cs2)) & 15u);
      const int n_h = min(((16 - delta) & 15) >> 2, R >> 2), hb = 4 * n_h;   // head: 4-byte pieces
      const int n_m = (R - hb) >> 4, hm = hb + 16 * n_m;                       // 16-byte pieces
      const int n_t = (R - hm) >> 2;                                            // tail: 4-byte pieces
      nm[a] = n_m;
      mo[a] = hb + 16 * lip;
      so[a] = lip < n_h ? 4 * lip : (lip < n_h + n_t ? hm + 4 * (lip - n_h) : -1);
      if (a) pad_v = delta; else pad_k = delta;
    }
  }
  int po_k = pad_k + hdr, po_v = pad_v + hdr;
  // a stage: the K box, then the V box at vofs; key j (0..15) of a box at rowK(j) / rowV(j) (tensor
  // copies of kpack records a box row: row j / kpack, record j % kpack in it)
  const int kp = REC ? 1 : kpack, kp_shift = __ffs(kp) - 1;   // (records: always 1)
  const int vofs = ((16 >> kp_shift) * sK + 127) & ~127;   // (a tensor copy's destination: 128-byte aligned)
  auto rowK = [&](int j) { return (j >> kp_shift) * sK + (j & (kp - 1)) * (int)cs1; };
  auto rowV = [&](int j) { return (j >> kp_shift) * sV + (j & (kp - 1)) * (int)cs1; };
  // tensor copies: a row sits at its address mod 16 in its box row (the same for K and V)
  auto tma_pad = [&](int h) { return (int)((reinterpret_cast<u64>(ck) + (u64)((i64)h * cs2)) & 15u); };
  const int n_w = R / copy_w;                   // generic copy: pieces per row
  const int row_step = 32 / n_w, piece_step = 32 - row_step * n_w;
  const i64 lane_b = (i64)b;

  const i64 row0 = lane_b * cs0 + (i64)kvh * cs2;   // contiguous: row (b, 0, kvh)
  // per-row offsets through shared memory: paged caches, the generic copy and fp8 external words
  const bool via_smem = block_tables != nullptr || !fast || (KIND == KIND_FP8 && fp8_mode == 1);

  // Load block li (keys [t0, t0 + 16) of the stream cursor `ic`, or of the split) into stage s.
  auto issue = [&](int li, int s, const Cursor& ic) {
    if (li < my_n) {
      const int t0 = STREAM ? ic.t0 : start + (warp + li * nw) * 16;
#if CUKV_DA_TMA
      if (REC) {   // whole token records (every KV head) of 16 keys, K and V, by one thread
        if (threadIdx.x == 0) {
          const u32 full = rec_bar + 8 * s;
          if (li >= STAGES) mbar_wait(rec_bar + 8 * (STAGES + s), ((li / STAGES) - 1) & 1);   // stage free
          mbar_expect_tx(full, 32u * (u32)sK);
          const u32 st_s = smem_s + (u32)(wbase + s * stage_bytes - smem);
          const int y0 = SW ? t0 * (int)(cs1 >> 7) : t0;   // (SW: the box rows are 128-byte lines)
          tma_load_3d(st_s, &tmk, 0, y0, ic.b, full);
          tma_load_3d(st_s + 16 * sK, &tmv, 0, y0, ic.b, full);
        }
        return;
      }
      if (STREAM || fast == 3) {   // two tensor copies (K box, V box) by lane 0; rows past the end are fixed up on arrival
        if (lane == 0) {
          const int nk = (STREAM ? ic.end : end) - t0, ib = STREAM ? ic.b : b;
          const int ih = STREAM ? ic.hy / n_hg : kvh, ipad = STREAM ? tma_pad(ih) : pad_k;
          const u32 bar = bar_s + 8 * s;
          masks[s] = nk >= 16 ? 0xffffu : (1u << nk) - 1u;
          mbar_expect_tx(bar, (u32)(16 >> kp_shift) * (u32)(sK + sV));
          const u32 st_s = smem_s + (u32)(wbase + s * stage_bytes - smem);
          // a box starts on a 16-byte boundary of the record: the row lands at pad (its address mod 16);
          // kp > 1: box rows of kp records, the box's x in 8-byte elements
          const int bx = kp == 1 ? ih * R - ipad : (ih * R - ipad) >> 3;
          tma_load_3d(st_s, &tmk, bx, t0 >> kp_shift, ib, bar);
          tma_load_3d(st_s + vofs, &tmv, bx, t0 >> kp_shift, ib, bar);
        }
        cp_async_commit();
        __syncwarp();
        return;
      }
#else
      if (STREAM) __trap();   // the host runs the stream schedule only with tensor copies (sm_90)
#endif
      bool ok = false;
      if (lane < 16) {
        const int t = t0 + lane;
        ok = t < end;
        if (via_smem) {
          i64 co = 0, wo = 0;
          if (ok) {
            i64 i0 = lane_b, i1 = t;
            if (block_tables) {
              const int pg = t / page_size;
              const int id = block_tables[lane_b * max_pages + pg];
              ok = id >= 0 && id < n_pages;
              i0 = 0;
              i1 = (i64)id * page_size + (t - pg * page_size);
            }
            if (ok) {
              co = i0 * cs0 + i1 * cs1 + (i64)kvh * cs2;
              wo = i0 * ws0 + i1 * ws1 + (i64)kvh * ws2;
            }
          }
          offs[lane] = co;
          offs[16 + lane] = wo;
        }
      }
      const u32 m = __ballot_sync(CUKV_FULL_MASK, ok);
      if (lane == 0) masks[s] = m;
      __syncwarp();
      u8* st = wbase + s * stage_bytes;
      const u32 st_s = smem_s + (u32)(st - smem);   // the stage as a shared-window address
      if (fast && !block_tables && t0 + 16 <= end) {
        // a whole block of a contiguous cache: lane walks its K and V rows kr + 4i (8 lanes per row)
        const i64 co = row0 + (i64)(t0 + kr) * cs1, step = 4 * cs1;
        const u8* srk = ck + co + mo[0];
        const u8* srv = cv + co + mo[1];
        u32 dk = st_s + kr * sK + pad_k + mo[0], dv = st_s + 16 * sK + kr * sV + pad_v + mo[1];
        const int ok_k = so[0] - mo[0], ok_v = so[1] - mo[1];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
          for (int j = 0; j < G_::NMID; ++j) {
            if (lip + 8 * j < nm[0]) cp_async<16>(dk + 128 * j, srk + 128 * j, false);
            if (lip + 8 * j < nm[1]) cp_async<16>(dv + 128 * j, srv + 128 * j, false);
          }
          if (so[0] >= 0) cp_async<4>(dk + ok_k, srk + ok_k, false);
          if (so[1] >= 0) cp_async<4>(dv + ok_v, srv + ok_v, false);
          srk += step;
          srv += step;
          dk += 4 * sK;
          dv += 4 * sV;
        }
      } else if (fast) {
        // 8 lanes per row, 4 rows per step: lane copies its pieces of K and V rows kr + 4i.
        const i64 co0 = row0 + (i64)(t0 + kr) * cs1;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int key = kr + 4 * i;
          const bool skip = !((m >> key) & 1u);
          i64 co = block_tables ? offs[key] : co0 + (i64)(4 * i) * cs1;
          co = skip ? 0 : co;   // skipped rows read nothing; keep the address in bounds anyway
          const u8* srk = ck + co;
          const u8* srv = cv + co;
          const u32 dk = st_s + key * sK + pad_k;
          const u32 dv = st_s + 16 * sK + key * sV + pad_v;
#pragma unroll
          for (int j = 0; j < G_::NMID; ++j) {
            if (lip + 8 * j < nm[0]) cp_async<16>(dk + mo[0] + 128 * j, srk + mo[0] + 128 * j, skip);
            if (lip + 8 * j < nm[1]) cp_async<16>(dv + mo[1] + 128 * j, srv + mo[1] + 128 * j, skip);
          }
          if (so[0] >= 0) cp_async<4>(dk + so[0], srk + so[0], skip);
          if (so[1] >= 0) cp_async<4>(dv + so[1], srv + so[1], skip);
        }
      } else {
        // Row rr < 16: K row of key rr; rr >= 16: V row of key rr-16. Lane copies pieces lane, lane+32..
        int rr = lane / n_w, pp = lane - rr * n_w;
        for (int i = lane; i < 32 * n_w; i += 32) {
          const int key = rr & 15;
          const bool isv = rr >= 16;
          const u8* src = (isv ? cv : ck) + offs[key] + pp * copy_w;
          const int doff = (isv ? 16 * sK + key * sV : key * sK) + pad + pp * copy_w;
          const bool skip = !((m >> key) & 1u);
          if (copy_w == 16) cp_async<16>(st_s + doff, src, skip);
          else if (copy_w == 8) cp_async<8>(st_s + doff, src, skip);
          else if (copy_w == 4) cp_async<4>(st_s + doff, src, skip);
          else st[doff] = skip ? (u8)0 : *src;
          rr += row_step;
          pp += piece_step;
          if (pp >= n_w) { pp -= n_w; ++rr; }
        }
      }
      if (KIND == KIND_FP8 && fp8_mode == 1) {
        const int key = lane & 15;
        const bool skip = !((m >> key) & 1u);
        const int* wsrc = reinterpret_cast<const int*>(lane >= 16 ? qpv : qpk) + offs[16 + key];
        cp_async<4>(st_s + 16 * (sK + sV) + 4 * lane, wsrc, skip);
      }
    }
    cp_async_commit();
    __syncwarp();
  };

  float o[NT][OT][4];
  // running max / sum of heads 8*hh + hb + k (l_run, z_run: over this thread's keys only)
  float m_run[NT][2], l_run[NT][2], z_run[NT][2];
  // fp8 V fold (see the header): o is kept in units of 2^(e_run - 127), z_run = sum_t p_t shift_t.
  int e_run;
  auto reset = [&]() {
#pragma unroll
    for (int a = 0; a < NT; ++a)
#pragma unroll
      for (int mt = 0; mt < OT; ++mt)
#pragma unroll
        for (int c = 0; c < 4; ++c) o[a][mt][c] = 0.0f;
#pragma unroll
    for (int hh = 0; hh < NT; ++hh)
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        m_run[hh][k] = CUKV_NEG_INF;
        l_run[hh][k] = 0.0f;
        z_run[hh][k] = 0.0f;
      }
    e_run = 1;
  };
  reset();
  // l_run, z_run: sums over the keys g of the warp
  auto warp_sums = [&]() {
#pragma unroll
    for (int hh = 0; hh < NT; ++hh)
#pragma unroll
      for (int k = 0; k < 2; ++k)
#pragma unroll
        for (int off = 4; off < 32; off <<= 1) {
          l_run[hh][k] += __shfl_xor_sync(CUKV_FULL_MASK, l_run[hh][k], off);
          if (FOLD) z_run[hh][k] += __shfl_xor_sync(CUKV_FULL_MASK, z_run[hh][k], off);
        }
  };
  // stream: the next block of the warp's item (the next lane with keys at the end of a lane)
  auto advance = [&](Cursor& c) {
    c.t0 += t_step;
    if (c.t0 >= c.end) {
      c.t0 = 0;
      do {
        ++c.b;
        c.end = c.b < n_lanes ? lane_len(c.b) : 1;
      } while (c.end == 0);
    }
  };
  // the d columns of o[.][mt][0, 1] (dA) and o[.][mt][2, 3] (dB) this thread holds
  // (HALF: positions 2 mm + h of the chunks, h = tid >> 1 the d half of this thread's columns)
  auto o_cols = [&](int mt, int& dA, int& dB) {
    constexpr int NG = D == 256 ? 2 : 1;
    constexpr int MPG = OT / NG;
    const int grp = mt / MPG, mm = mt - grp * MPG;
    const int cA = grp, cB = D == 64 ? 0 : grp + G_::VCH / 2;
    const int pm = HALF ? 2 * mm + (tid >> 1) : mm;
    const int pA = D == 64 ? pm : (pm & 7);
    const int pB = D == 64 ? pm + 4 : (pm & 7);
    dA = 8 * (g + 8 * cA) + chunk_perm<KIND>(pA);
    dB = 8 * (g + 8 * cB) + chunk_perm<KIND>(pB);
  };
  // stream: this warp's partial of its lane and item to slot (b + k) * n_items + hy (k: the position
  // stream) of part_a [slots, hs, D] (a = unnormalised output incl. the fp8 shift sum) and part_ml
  // [slots, 2, hs] (m natural log, l), hs = min(16, r) heads per slot; see decode_attn_merge_stream.
  auto flush = [&]() {
    warp_sums();
    const float o_unit = FOLD ? __uint_as_float((u32)e_run << 23) : 1.0f;
    const int hs = min(16, r);
    const i64 slot = ((i64)b + stream_k) * n_items + hy;
    float* pa = part_a + slot * hs * D;
#pragma unroll
    for (int hh = 0; hh < NT; ++hh) {
      const int hl = 8 * hh + hb;
#pragma unroll
      for (int mt = 0; mt < OT; ++mt) {
        int dA, dB;
        o_cols(mt, dA, dB);
        if (hl < nh) {
          st_part(pa + hl * D + dA, o[hh][mt][0] * o_unit + z_run[hh][0]);
          st_part(pa + hl * D + dB, o[hh][mt][2] * o_unit + z_run[hh][0]);
        }
        if (hl + 1 < nh) {
          st_part(pa + (hl + 1) * D + dA, o[hh][mt][1] * o_unit + z_run[hh][1]);
          st_part(pa + (hl + 1) * D + dB, o[hh][mt][3] * o_unit + z_run[hh][1]);
        }
      }
      if (g == 0 && ml_w) {
#pragma unroll
        for (int k = 0; k < 2; ++k)
          if (hl + k < nh) {
            st_part(part_ml + slot * 2 * hs + hl + k, m_run[hh][k] == CUKV_NEG_INF ? CUKV_NEG_INF : m_run[hh][k] * CUKV_LN2);
            st_part(part_ml + slot * 2 * hs + hs + hl + k, l_run[hh][k]);
          }
      }
    }
  };
  // stream: rows at their address mod 16 in their box row; records: at the head's offset in the record
  auto stream_pads = [&]() {
    pad_k = pad_v = REC ? kvh * R : tma_pad(kvh);
    po_k = po_v = pad_k + hdr;
  };
  if (STREAM) stream_pads();
  // SW: this thread's word offsets in a stage's K / V box, loop invariant (a records warp keeps its KV
  // head; rows j and j + 8 share a swizzle pattern, 8 records being a multiple of 1024 bytes). K: key
  // kg, payload words u*UB + tid + 4j and its qparam chunk; V: keys of pattern kk (HALF: tid + 4kk,
  // else 2 tid + kk), chunks g + 8 cA (and g + 8 cB) of each chunk group, and their qparam chunks.
  constexpr int NKW = G_::KU * (G_::UB / 4), NGV = D == 256 ? 2 : 1, NVW = D == 64 ? NGV : 2 * NGV;
  u32 kso[SW ? NKW : 1], vso[2][SW ? NVW : 1], khs = 0, vhs[2] = {0, 0};
  if (SW) {
    if ((smem_s + (u32)(wbase - smem)) & 1023u) __trap();   // (the host's layout keeps stages aligned)
#pragma unroll
    for (int u = 0; u < G_::KU; ++u)
#pragma unroll
      for (int j = 0; j < G_::UB / 4; ++j)
        kso[u * (G_::UB / 4) + j] = swz_off((u32)(rowK(kg) + po_k + 4 * (u * G_::UB + tid + 4 * j)));
    khs = swz_off((u32)(rowK(kg) + pad_k));
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) {
      const int key = HALF ? tid + 4 * kk : 2 * tid + kk;
      vhs[kk] = swz_off((u32)(rowV(key) + pad_v));
#pragma unroll
      for (int grp = 0; grp < NGV; ++grp) {
        const int cA = grp, cB = D == 64 ? 0 : grp + G_::VCH / 2;
        vso[kk][D == 64 ? grp : 2 * grp] = swz_off((u32)(rowV(key) + po_v + (g + 8 * cA) * G_::CB));
        if (D != 64) vso[kk][2 * grp + 1] = swz_off((u32)(rowV(key) + po_v + (g + 8 * cB) * G_::CB));
      }
    }
  }
  Cursor ic = cc;   // stream: the block issued next
  // the first copies go out before the q fragments load (records: thread 0 initialised the barriers)
  auto first_issues = [&]() {
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      issue(s, s, ic);
      if (STREAM) advance(ic);
    }
  };
  if (REC) first_issues();
  if (!STREAM) load_q(threadIdx.x, blockDim.x);
  else if (my_n > 0) load_q(lane, 32);
  load_hs();
  __syncthreads();   // q fragments ready (and the barriers initialised)
  if (!REC) first_issues();

  for (int j = 0; j < my_n; ++j) {
    issue(j + STAGES - 1, (j + STAGES - 1) % STAGES, ic);
    if (STREAM) advance(ic);
    cp_async_wait<STAGES - 1>();
    const int s = j % STAGES;
    const int t0 = STREAM ? cc.t0 : start + (warp + j * nw) * 16;
    const int nk = end - t0;
#if CUKV_DA_TMA
    if (REC) {
      mbar_wait(rec_bar + 8 * s, (j / STAGES) & 1);
      if (nk < 16) {   // keys past the lane: zero this head's V rows (0 * NaN); other heads are other warps'
        u32* sv = reinterpret_cast<u32*>(wbase + s * stage_bytes + 16 * sK + nk * sK + pad_v);
        for (int o = lane; o < (16 - nk) * (R >> 2); o += 32) {
          const int row = o / (R >> 2);
          const int wd = row * (sK >> 2) + (o - row * (R >> 2));
          if (SW) {
            const u32 at = (u32)(reinterpret_cast<u8*>(sv + wd) - (wbase + s * stage_bytes));
            *reinterpret_cast<u32*>(wbase + s * stage_bytes + swz_off(at)) = 0u;
          } else {
            sv[wd] = 0u;
          }
        }
      }
    } else if (STREAM || fast == 3) {
      mbar_wait(bar_s + 8 * s, (phase >> s) & 1u);
      phase ^= 1u << s;
      if (nk < 16) {   // keys past the split were loaded (in bounds): zero their V rows (0 * NaN)
        u8* sv = wbase + s * stage_bytes + vofs;
        if (kp == 1) {
          for (int o = 16 * lane; o < (16 - nk) * sV; o += 512)
            *reinterpret_cast<uint4*>(sv + nk * sV + o) = make_uint4(0, 0, 0, 0);
        } else {
          for (int o = lane; o < (16 - nk) * (R >> 2); o += 32) {
            const int key = nk + o / (R >> 2);
            reinterpret_cast<u32*>(sv + rowV(key) + pad_v)[o - (key - nk) * (R >> 2)] = 0u;
          }
        }
      }
    }
#endif
    __syncwarp();
    const u8* st = wbase + s * stage_bytes;
    const u8* stK = st;
    const u8* stV = st + vofs;
    const u32* stW = reinterpret_cast<const u32*>(st + 16 * (sK + sV));
    // SW: the V word of chunk group grp, chunk A (b = 0) or B (b = 1), of swizzle pattern kk in rows
    // 8 * half .. (see vso)
    auto sw_v = [&](int kk, int half, int grp, int b) {
      return *reinterpret_cast<const u32*>(stV + vso[kk][D == 64 ? grp : 2 * grp + b] + half * 8 * sV);
    };
    const u32 vm = REC ? (nk >= 16 ? 0xffffu : (1u << nk) - 1u) : masks[s];

    auto row_q = [&](const u8* row, int key, bool isv) {
      RowQ rq;
      const u8* h = row + (isv ? pad_v : pad_k);   // the row's first byte (its qparam words)
      rq.s = 0.0f; rq.z = 0.0f; rq.hdr = h;
      if (KIND == KIND_FP8) {   // one unconditional load (no branch: it can be scheduled early)
        const u32 wd = *(fp8_mode == 1 ? stW + (isv ? 16 : 0) + key : reinterpret_cast<const u32*>(h));
        const bool head_s = fp8_mode == 2;
        rq.s = head_s ? (isv ? hs_v : hs_k) : f16_to_f32((u16)(wd & 0xffffu));
        rq.z = head_s ? -0.0f : f16_to_f32((u16)(wd >> 16));
      }
      return rq;
    };

    // ---- S^T = K Q^T (keys on the mma rows, so 8 query heads fill an n-tile): this thread decodes
    // keys kg and 8 + kg; sc[hh][c] is (key kg + 8*(c>>1), head 8*hh + hb + (c&1)).
    // (two accumulator chains per tile, even and odd k-steps, for latency: summed below; int4 has
    // no registers to spare)
    // int4: the identity B fragment of widen_int4 (1.0 where k-slot 2*tid (+1) is column g)
    const u32 eye = (2 * tid == g ? 0x3c00u : 0u) | (2 * tid + 1 == g ? 0x3c000000u : 0u);
    float sc[NT][4], sc2[NT][4];
#pragma unroll
    for (int hh = 0; hh < NT; ++hh)
#pragma unroll
      for (int c = 0; c < 4; ++c) sc[hh][c] = sc2[hh][c] = 0.0f;
    {
      const u8* kr0 = stK + rowK(kg);
      const u8* kr1 = stK + rowK(8 + kg);
      RowQ q0 = row_q(kr0, kg, false), q1 = row_q(kr1, 8 + kg, false);
      if (SW) {   // (the qparam chunk: one 16-byte chunk, int4:g4)
        q0.hdr = stK + khs;
        q1.hdr = stK + khs + 8 * sK;
      }
#pragma unroll
      for (int u = 0; u < G_::KU; ++u) {
        u32 raw0[G_::UB / 4], raw1[G_::UB / 4];
        if (KIND == KIND_BF16) {
          lds<KIND, G_::UB>(kr0 + po_k + (u * 4 + tid) * G_::UB, raw0);
          lds<KIND, G_::UB>(kr1 + po_k + (u * 4 + tid) * G_::UB, raw1);
        } else {   // interleaved words, see k_elem
          const u32* kw0 = reinterpret_cast<const u32*>(kr0 + po_k) + u * G_::UB + tid;
          const u32* kw1 = reinterpret_cast<const u32*>(kr1 + po_k) + u * G_::UB + tid;
#pragma unroll
          for (int j = 0; j < G_::UB / 4; ++j) {
            if (SW) {
              raw0[j] = *reinterpret_cast<const u32*>(stK + kso[u * (G_::UB / 4) + j]);
              raw1[j] = *reinterpret_cast<const u32*>(stK + kso[u * (G_::UB / 4) + j] + 8 * sK);
            } else {
              raw0[j] = kw0[4 * j];
              raw1[j] = kw1[4 * j];
            }
          }
        }
#pragma unroll
        for (int c = 0; c < G_::CPU; ++c) {
          const int lc = u * G_::CPU + c;
          const int ckk = KIND == KIND_INT4 ? k_word<KIND, D>(lc, tid) : 0;   // int4: chunk = word
          const uint4 qa = qf[(2 * lc) * 32 + lane], qb = qf[(2 * lc + 1) * 32 + lane];
          u32 p0[4], p1[4], w0[4], w1[4];
          pre_chunk<KIND, D>(raw0 + c * (G_::CB / 4), ckk, q0, gshift, p0);
          pre_chunk<KIND, D>(raw1 + c * (G_::CB / 4), ckk, q1, gshift, p1);
          if (KIND == KIND_INT4) {
            widen_int4(p0, p1, eye, w0, w1);
          } else {
            pack_chunk<KIND>(p0, q0, w0);
            pack_chunk<KIND>(p1, q1, w1);
          }
          // S^T = K Q^T: A = K (keys g, g+8 x the k-step's 16 slots), B = Q^T (head tile hh)
#pragma unroll
          for (int hh = 0; hh < NT; ++hh) {
            mma_bf16(sc[hh], w0[0], w1[0], w0[1], w1[1], hh ? qa.y : qa.x, hh ? qa.w : qa.z);
            mma_bf16(KIND == KIND_INT4 ? sc[hh] : sc2[hh], w0[2], w1[2], w0[3], w1[3], hh ? qb.y : qb.x,
                     hh ? qb.w : qb.z);
          }
        }
      }
    }

#pragma unroll
    for (int hh = 0; hh < NT; ++hh)
#pragma unroll
      for (int c = 0; c < 4; ++c) sc[hh][c] += sc2[hh][c];

    // ---- scores (log2 units; masked keys -inf)
    const bool ok_lo = (vm >> kg) & 1u, ok_hi = (vm >> (8 + kg)) & 1u;
    float x[NT][4];
#pragma unroll
    for (int hh = 0; hh < NT; ++hh)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const bool ok = c < 2 ? ok_lo : ok_hi;
        x[hh][c] = ok ? sc[hh][c] * scale_log2 : CUKV_NEG_INF;
        if (dots != nullptr && ok && ml_w) {
          const int head = 8 * hh + hb + (c & 1), key = kg + 8 * (c >> 1);
          if (head < nh) dots[((i64)b * n_heads + h0 + head) * dots_cap + t0 + key] = sc[hh][c];
        }
      }

    // ---- V rows of this thread in the P.V product: keys 2t, 2t+1, 8+2t, 8+2t+1 (HALF: t, t+4, 8+t, 12+t).
    auto v_rows = [&](const u8* (&vr)[4], RowQ (&vq)[4]) {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int key = (k >> 1) * 8 + (HALF ? tid + 4 * (k & 1) : 2 * tid + (k & 1));
        vr[k] = stV + rowV(key);
        vq[k] = row_q(vr[k], key, true);
        if (SW) vq[k].hdr = stV + vhs[k & 1] + (k >> 1) * 8 * sV;
      }
    };
    const u8* vr[4];
    RowQ vq[4];
    // fp8: the V scales are folded into the probabilities (keys kg, 8 + kg here). e_run: the largest
    // biased fp32 exponent of any V scale seen so far (warp-uniform); p'_t = p_t * scale_t *
    // 2^(127 - e_run) < 2 in fp16.
    float fe = 1.0f, sf[2] = {1.0f, 1.0f}, zs[2] = {0.0f, 0.0f};
    if (FOLD) {
      const RowQ va = row_q(stV + rowV(kg), kg, true), vb = row_q(stV + rowV(8 + kg), 8 + kg, true);
      u32 eb = max(__float_as_uint(va.s) & 0x7f800000u, __float_as_uint(vb.s) & 0x7f800000u);
      eb = max(eb, (u32)__shfl_xor_sync(CUKV_FULL_MASK, eb, 4));
      eb = max(eb, (u32)__shfl_xor_sync(CUKV_FULL_MASK, eb, 8));
      eb = max(eb, (u32)__shfl_xor_sync(CUKV_FULL_MASK, eb, 16));
      const int e_new = max(e_run, min((int)(eb >> 23), 253));
      const int de = 127 + e_run - e_new;                        // o *= 2^(e_run - e_new)
      fe = de >= 1 ? __uint_as_float((u32)de << 23) : 0.0f;
      e_run = e_new;
      const float inv = __uint_as_float((u32)(254 - e_new) << 23);   // 2^(127 - e_new), normal
      sf[0] = va.s * inv;
      sf[1] = vb.s * inv;
      zs[0] = va.z;
      zs[1] = vb.z;
    }

    u32 pb[NT][2];
#pragma unroll
    for (int hh = 0; hh < NT; ++hh) {   // heads 8*hh + 2*tid + k, k = 0, 1
      float alpha[2], p[4];
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        float mx = fmaxf(x[hh][k], x[hh][2 + k]);   // keys g, 8 + g; then over g
        mx = fmaxf(mx, __shfl_xor_sync(CUKV_FULL_MASK, mx, 4));
        mx = fmaxf(mx, __shfl_xor_sync(CUKV_FULL_MASK, mx, 8));
        mx = fmaxf(mx, __shfl_xor_sync(CUKV_FULL_MASK, mx, 16));
        const float mnew = fmaxf(m_run[hh][k], mx);
        const float mu = mnew == CUKV_NEG_INF ? 0.0f : mnew;
        alpha[k] = ex2_approx(m_run[hh][k] - mu);
        m_run[hh][k] = mnew;
        p[k] = ex2_approx(x[hh][k] - mu);
        p[2 + k] = ex2_approx(x[hh][2 + k] - mu);
        l_run[hh][k] = l_run[hh][k] * alpha[k] + (p[k] + p[2 + k]);   // this thread's keys only
        if (FOLD) z_run[hh][k] = z_run[hh][k] * alpha[k] + (p[k] * zs[0] + p[2 + k] * zs[1]);
      }
      // O^T columns of this head tile are heads 8*hh + hb and + 1: their alphas are local.
      if (__any_sync(CUKV_FULL_MASK, alpha[0] != 1.0f || alpha[1] != 1.0f) || fe != 1.0f) {
        const float a_lo = alpha[0] * fe, a_hi = alpha[1] * fe;
#pragma unroll
        for (int mt = 0; mt < OT; ++mt) {
          o[hh][mt][0] *= a_lo;
          o[hh][mt][1] *= a_hi;
          o[hh][mt][2] *= a_lo;
          o[hh][mt][3] *= a_hi;
        }
      }
      // P^T fragments (B of the P.V product: keys 2t, 2t+1 / 8+2t, 8+2t+1 of head 8*hh + g; HALF: keys
      // t, t+4 / 8+t, 12+t of column g) are the transposes of the 8x8 tiles (key kg / 8+kg; heads hb,
      // hb+1) this thread holds.
      u32 t_lo, t_hi;
      if (KIND == KIND_BF16) {
        t_lo = pack_bf16x2(p[0], p[1]);
        t_hi = pack_bf16x2(p[2], p[3]);
      } else {   // fp16 P (fp8: scaled by sf, see above)
        t_lo = pack_f16x2(p[0] * sf[0], p[1] * sf[0]);
        t_hi = pack_f16x2(p[2] * sf[1], p[3] * sf[1]);
      }
      pb[hh][0] = movmatrix_trans(t_lo);
      pb[hh][1] = movmatrix_trans(t_hi);
    }

    // ---- O^T += V^T P^T: this thread holds keys 2t, 2t+1, 8+2t, 8+2t+1 and V chunks g + 8*ci.
    {
      v_rows(vr, vq);   // (fp8: only the row addresses are used)
      constexpr int NG = D == 256 ? 2 : 1;           // chunk groups
      constexpr int MPG = KS / NG;                    // m-tiles per group
#pragma unroll
      for (int grp = 0; grp < NG; ++grp) {
        const int cA = grp, cB = D == 64 ? 0 : grp + G_::VCH / 2;
        if (HALF) {
          // <= 4 heads: the reduction index k of a product is (key i of a half block, d half h) =
          // 2i + h, and column n of B is head n & 3 with d half n >> 2: B = P where h == n >> 2, else 0.
          // So C[d row][n] = sum_i V[i][d(row, n >> 2)] P[i][n & 3], both d halves of a row in one tile
          // (KS / 2 accumulator tiles), and A words are one key's decoded positions (2 mm, 2 mm + 1):
          // no pairing of two keys (fp8: one cvt of two adjacent codes, fp16 operands; its scales are in
          // P). kh: keys 8*kh + (t, t + 4) of this thread (vr[2 kh], vr[2 kh + 1]).
          const u32 s0 = g < 4 ? 0x4410u : 0x1044u, s1 = g < 4 ? 0x4432u : 0x3244u;   // P lo / hi into h
#pragma unroll
          for (int kh = 0; kh < 2; ++kh) {
            u32 VA[2][4], VB[2][4];
#pragma unroll
            for (int k = 0; k < 2; ++k) {
              u32 raw[G_::CB / 4];
              const int cva = g + 8 * cA;
              if (SW) raw[0] = sw_v(k, kh, grp, 0);
              else lds<KIND, G_::CB>(vr[2 * kh + k] + po_v + cva * G_::CB, raw);
              pre_chunk<KIND, D>(raw, cva, vq[2 * kh + k], gshift, VA[k]);
              if (D != 64) {
                const int cvb = g + 8 * cB;
                if (SW) raw[0] = sw_v(k, kh, grp, 1);
                else lds<KIND, G_::CB>(vr[2 * kh + k] + po_v + cvb * G_::CB, raw);
                pre_chunk<KIND, D>(raw, cvb, vq[2 * kh + k], gshift, VB[k]);
              }
            }
            const u32 b0 = __byte_perm(pb[0][kh], 0u, s0), b1 = __byte_perm(pb[0][kh], 0u, s1);
            constexpr int MPH = OT / NG;
#pragma unroll
            for (int mm = 0; mm < MPH; ++mm) {
              const int mt = grp * MPH + mm;
              const int wB = D == 64 ? mm + 2 : mm;   // the word of positions (pB, pB + 1)
              const u32(&XB)[2][4] = D == 64 ? VA : VB;
              if (KIND == KIND_BF16) mma_bf16(o[0][mt], VA[0][mm], XB[0][wB], VA[1][mm], XB[1][wB], b0, b1);
              else mma_f16(o[0][mt], VA[0][mm], XB[0][wB], VA[1][mm], XB[1][wB], b0, b1);
            }
          }
        } else if (FOLD) {
          // fp8: A = the exact e4m3 values as fp16. One byte permute pairs a position of two keys
          // (two positions per permute), one cvt gives the fp16 pair.
          u32 RA[4][2], RB[4][2];
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            lds<KIND, 8>(vr[k] + po_v + (g + 8 * cA) * 8, RA[k]);
            if (D != 64) lds<KIND, 8>(vr[k] + po_v + (g + 8 * cB) * 8, RB[k]);
          }
#pragma unroll
          for (int mp = 0; mp < MPG; mp += 2) {
            const int pA = D == 64 ? mp : (mp & 7);
            const int pB = D == 64 ? mp + 4 : (mp & 7);
            const u32(&XB)[4][2] = D == 64 ? RA : RB;
            const u32 bA = pA & 3, bB = pB & 3;
            const u32 selA = bA | ((4 + bA) << 4) | ((bA + 1) << 8) | ((5 + bA) << 12);
            const u32 selB = bB | ((4 + bB) << 4) | ((bB + 1) << 8) | ((5 + bB) << 12);
            const u32 w01A = __byte_perm(RA[0][pA >> 2], RA[1][pA >> 2], selA);
            const u32 w23A = __byte_perm(RA[2][pA >> 2], RA[3][pA >> 2], selA);
            const u32 w01B = __byte_perm(XB[0][pB >> 2], XB[1][pB >> 2], selB);
            const u32 w23B = __byte_perm(XB[2][pB >> 2], XB[3][pB >> 2], selB);
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const int mt = grp * MPG + mp + h;
              const u32 a0 = h ? e4m3x2_hi_to_f16x2(w01A) : e4m3x2_to_f16x2(w01A);
              const u32 a1 = h ? e4m3x2_hi_to_f16x2(w01B) : e4m3x2_to_f16x2(w01B);
              const u32 a2 = h ? e4m3x2_hi_to_f16x2(w23A) : e4m3x2_to_f16x2(w23A);
              const u32 a3 = h ? e4m3x2_hi_to_f16x2(w23B) : e4m3x2_to_f16x2(w23B);
#pragma unroll
              for (int hh = 0; hh < NT; ++hh) mma_f16(o[hh][mt], a0, a1, a2, a3, pb[hh][0], pb[hh][1]);
            }
          }
        } else {
          // bf16: the raw pairs; int4: RN_f16(q*scale + shift) pairs (fp16 operands, no bf16 step).
          u32 VA[4][4], VB[4][4];
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            u32 raw[G_::CB / 4];
            const int cva = g + 8 * cA;
            if (SW) raw[0] = sw_v(k & 1, k >> 1, grp, 0);
            else lds<KIND, G_::CB>(vr[k] + po_v + cva * G_::CB, raw);
            pre_chunk<KIND, D>(raw, cva, vq[k], gshift, VA[k]);
            if (D != 64) {
              const int cvb = g + 8 * cB;
              if (SW) raw[0] = sw_v(k & 1, k >> 1, grp, 1);
              else lds<KIND, G_::CB>(vr[k] + po_v + cvb * G_::CB, raw);
              pre_chunk<KIND, D>(raw, cvb, vq[k], gshift, VB[k]);
            }
          }
#pragma unroll
          for (int mm = 0; mm < MPG; ++mm) {
            const int mt = grp * MPG + mm;
            const int pA = D == 64 ? mm : (mm & 7);
            const int pB = D == 64 ? mm + 4 : (mm & 7);
            const u32(&XB)[4][4] = D == 64 ? VA : VB;
            // (key 2t, key 2t+1) or (key 2t+8, key 2t+9) at one d
            const u32 a0 = pair_sel(VA[0][pA >> 1], VA[1][pA >> 1], pA & 1);
            const u32 a1 = pair_sel(XB[0][pB >> 1], XB[1][pB >> 1], pB & 1);
            const u32 a2 = pair_sel(VA[2][pA >> 1], VA[3][pA >> 1], pA & 1);
            const u32 a3 = pair_sel(XB[2][pB >> 1], XB[3][pB >> 1], pB & 1);
#pragma unroll
            for (int hh = 0; hh < NT; ++hh) {
              if (KIND == KIND_BF16) mma_bf16(o[hh][mt], a0, a1, a2, a3, pb[hh][0], pb[hh][1]);
              else mma_f16(o[hh][mt], a0, a1, a2, a3, pb[hh][0], pb[hh][1]);
            }
          }
        }
      }
    }
    __syncwarp();
#if CUKV_DA_TMA
    if (REC && lane == 0) mbar_arrive(rec_bar + 8 * (STAGES + s));   // this warp is done with stage s
#endif
    if (STREAM) {   // the item ends (or the warp's blocks do): its partial goes out, the next one starts
      Cursor nx = cc;
      advance(nx);
      const bool last = j + 1 == my_n;
      if (last || nx.b != cc.b) {
        flush();
        if (!last) {
          set_item(nx.b, nx.hy);
          end = nx.end;
          stream_pads();
          reset();
          load_q(lane, 32);
          load_hs();
          __syncwarp();
        }
      }
      cc = nx;
    }
  }
  cp_async_wait<0>();
#if CUKV_DA_TMA
  if (REC) {
    __syncthreads();   // every warp is past its last wait
    if (threadIdx.x == 0) {
#pragma unroll
      for (int s = 0; s < 2 * STAGES; ++s) mbar_inval(rec_bar + 8 * s);
    }
  } else if (fast == 3 && lane == 0) {   // every armed stage was waited for above; the memory is reused below
#pragma unroll
    for (int s = 0; s < STAGES; ++s) mbar_inval(bar_s + 8 * s);
  }
#endif
  (void)phase;
  (void)bar_s;
  if (STREAM) return;

  // ---- merge the warps of this CTA (the combine area aliases the pipelines).
  warp_sums();
  const float o_unit = FOLD ? __uint_as_float((u32)e_run << 23) : 1.0f;   // 2^(e_run - 127)
  __syncthreads();
  float* cO = reinterpret_cast<float*>(smem + KS * 32 * 16);   // [nw][16][D]
  float* cm = cO + nw * 16 * D;                                   // [nw][16]
  float* cl = cm + nw * 16;                                       // [nw][16]
  float* cz = cl + nw * 16;                                       // [nw][16] (fp8: sum p*shift)
#pragma unroll
  for (int hh = 0; hh < NT; ++hh) {
    if (g == 0 && ml_w) {
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        const int head = 8 * hh + hb + k;
        cm[warp * 16 + head] = m_run[hh][k];
        cl[warp * 16 + head] = l_run[hh][k];
        cz[warp * 16 + head] = FOLD ? z_run[hh][k] : 0.0f;
      }
    }
#pragma unroll
    for (int mt = 0; mt < OT; ++mt) {
      int dA, dB;
      o_cols(mt, dA, dB);
      float* ob = cO + (warp * 16 + 8 * hh + hb) * D;
      ob[dA] = o[hh][mt][0] * o_unit;
      ob[D + dA] = o[hh][mt][1] * o_unit;
      ob[dB] = o[hh][mt][2] * o_unit;
      ob[D + dB] = o[hh][mt][3] * o_unit;
    }
  }
  __syncthreads();
  const bool direct = part_a == nullptr;
  for (int i = threadIdx.x; i < nh * D; i += blockDim.x) {
    const int head = i / D, d = i - head * D;
    float M = CUKV_NEG_INF;
    for (int w = 0; w < nw; ++w) M = fmaxf(M, cm[w * 16 + head]);
    float acc = 0.0f, l = 0.0f;
    if (M != CUKV_NEG_INF) {
      for (int w = 0; w < nw; ++w) {
        const float f = ex2_approx(cm[w * 16 + head] - M);
        acc += f * (cO[(w * 16 + head) * D + d] + cz[w * 16 + head]);
        l += f * cl[w * 16 + head];
      }
    }
    const i64 hq = (i64)b * n_heads + h0 + head;
    const int split = head_major ? blockIdx.y : blockIdx.x;
    if (direct) {
      out[hq * D + d] = f32_to_bf16(M == CUKV_NEG_INF ? 0.0f : acc / l);
      if (d == 0) lse[hq] = M == CUKV_NEG_INF ? CUKV_NEG_INF : M * CUKV_LN2 + logf(l);
    } else {
      part_a[(((i64)b * num_splits + split) * n_heads + h0 + head) * D + d] = acc;
      if (d == 0) {
        part_ml[(((i64)b * 2 + 0) * num_splits + split) * n_heads + h0 + head] =
            M == CUKV_NEG_INF ? CUKV_NEG_INF : M * CUKV_LN2;
        part_ml[(((i64)b * 2 + 1) * num_splits + split) * n_heads + h0 + head] = l;
      }
    }
  }
}

// ------------------------------------------------------------------------------------ merge
// out = sum_s e^(m_s - m) a_s / sum_s e^(m_s - m) l_s; lse = m + ln(l), over `count` partials of one
// task (lane, query head): a_s = arow[s * astep + d] (unnormalised), m_s = mrow[s * mstep] (natural log
// units), l_s = lrow[s * mstep]. merge_task: one warp merges a task (a block serves NWM tasks, no block
// barrier); lane k holds the V = D/32 columns from k*V of a row. The merge is latency-bound, so the
// first CH rows are loaded before the (m, l) reduction needs them and every later chunk of CH rows is
// loaded at once: with a few partials per task (the usual stream schedule) a task costs two memory
// round trips. Tasks with many partials take merge_wide below. Fixed order throughout: deterministic.
template <int V>   // floats per lane: D / 32
__device__ __forceinline__ void ld_cols(const float* p, float (&x)[V]) {
  if (V == 2) {
    const float2 t = *reinterpret_cast<const float2*>(p);
    x[0] = t.x; x[1] = t.y;
  } else {
#pragma unroll
    for (int k = 0; k < V; k += 4) {
      const float4 t = *reinterpret_cast<const float4*>(p + k);
      x[k] = t.x; x[k + 1] = t.y; x[k + 2] = t.z; x[k + 3] = t.w;
    }
  }
}

template <int V>
__device__ __forceinline__ void merge_task(const float* __restrict__ arow, i64 astep, const float* __restrict__ mrow,
                                           const float* __restrict__ lrow, i64 mstep, int count,
                                           u16* __restrict__ orow, float* __restrict__ lse_out) {
  constexpr int CH = V == 8 ? 4 : 8;   // rows in flight per warp
  const int lane = threadIdx.x & 31;
  const float* col = arow + lane * V;
  float x[CH][V];
  auto load_chunk = [&](int c) {   // rows c + j, j < CH
#pragma unroll
    for (int j = 0; j < CH; ++j)
      if (c + j < count) ld_cols<V>(col + (i64)(c + j) * astep, x[j]);
  };
  load_chunk(0);   // in flight during the (m, l) reduction
  float m = CUKV_NEG_INF, l = 0.0f;
  for (int s = lane; s < count; s += 32) {
    const float ms = mrow[(i64)s * mstep], ls = lrow[(i64)s * mstep];
    const float mn = fmaxf(m, ms);
    if (mn != CUKV_NEG_INF) l = l * __expf(m - mn) + ls * __expf(ms - mn);
    m = mn;
  }
  float M = m;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) M = fmaxf(M, __shfl_xor_sync(CUKV_FULL_MASK, M, off));
  float L = M == CUKV_NEG_INF || m == CUKV_NEG_INF ? 0.0f : l * __expf(m - M);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) L += __shfl_xor_sync(CUKV_FULL_MASK, L, off);
  float acc[V];
#pragma unroll
  for (int k = 0; k < V; ++k) acc[k] = 0.0f;
  if (M != CUKV_NEG_INF) {
    for (int c = 0; c < count; c += CH) {
      if (c > 0) load_chunk(c);
#pragma unroll
      for (int j = 0; j < CH; ++j) {
        const int s = c + j;
        if (s < count) {
          const float ms = mrow[(i64)s * mstep];
          const float w = ms == CUKV_NEG_INF ? 0.0f : __expf(ms - M);
#pragma unroll
          for (int k = 0; k < V; ++k) acc[k] += w * x[j][k];
        }
      }
    }
  }
#pragma unroll
  for (int k = 0; k + 1 < V; k += 2)
    *reinterpret_cast<u32*>(orow + lane * V + k) = M == CUKV_NEG_INF ? 0u : pack_bf16x2(acc[k] / L, acc[k + 1] / L);
  if (lane == 0 && lse_out != nullptr) *lse_out = M == CUKV_NEG_INF ? CUKV_NEG_INF : M + logf(L);
}

// WIDE (many partials, e.g. 264 at batch 1): one block merges 32 columns of a task. Warp w takes the
// partials w, w + NWM, .. in chunks of CH rows a warp, all loaded at once (lane k: column k of each row,
// whole 128-byte lines; and the m, l of rows k and k + 32 of the chunk), folded into a running (m, l, a)
// of the warp; then the warps' maxima, each warp rescaled to the block's, and a fixed-order sum of the
// warps through shared memory (deterministic). At batch 1 (264 partials, 33 a warp) one memory round
// trip instead of merge_task's four or five (H100 int4:g4 B1 T131072, wait to exit 5.3 -> 4.3-4.8 us;
// a thread a partial row, its 32 columns as float4, measured alike).
template <int NWM>
__device__ __forceinline__ void merge_wide(const float* __restrict__ arow, i64 astep, const float* __restrict__ mrow,
                                           const float* __restrict__ lrow, i64 mstep, int count,
                                           u16* __restrict__ orow, float* __restrict__ lse_out) {
  constexpr int CH = 40;   // rows in flight per warp (<= 64)
  __shared__ float red[2 * NWM];
  __shared__ float sums[NWM][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float m = CUKV_NEG_INF, l = 0.0f, acc = 0.0f;
  for (int c = warp; c < count; c += CH * NWM) {   // rows c + NWM j, j < CH
    float x[CH];
#pragma unroll
    for (int j = 0; j < CH; ++j) x[j] = c + NWM * j < count ? arow[(i64)(c + NWM * j) * astep + lane] : 0.0f;
    const int sa = c + NWM * lane, sb = c + NWM * (lane + 32);
    const float ma = sa < count ? mrow[(i64)sa * mstep] : CUKV_NEG_INF;
    const float la = sa < count ? lrow[(i64)sa * mstep] : 0.0f;
    const float mb = lane + 32 < CH && sb < count ? mrow[(i64)sb * mstep] : CUKV_NEG_INF;
    const float lb = lane + 32 < CH && sb < count ? lrow[(i64)sb * mstep] : 0.0f;
    float mc = fmaxf(ma, mb);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) mc = fmaxf(mc, __shfl_xor_sync(CUKV_FULL_MASK, mc, off));
    const float mn = fmaxf(m, mc);
    if (mn == CUKV_NEG_INF) continue;   // (warp-uniform)
    const float fo = __expf(m - mn);
    float lc = (ma == CUKV_NEG_INF ? 0.0f : la * __expf(ma - mn)) + (mb == CUKV_NEG_INF ? 0.0f : lb * __expf(mb - mn));
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) lc += __shfl_xor_sync(CUKV_FULL_MASK, lc, off);
    float a = 0.0f;
#pragma unroll
    for (int j = 0; j < CH; ++j) {
      const float ms = __shfl_sync(CUKV_FULL_MASK, j < 32 ? ma : mb, j & 31);
      a += (ms == CUKV_NEG_INF ? 0.0f : __expf(ms - mn)) * x[j];
    }
    acc = acc * fo + a;
    l = l * fo + lc;
    m = mn;
  }
  if (lane == 0) red[warp] = m;
  __syncthreads();
  float M = red[0];
#pragma unroll
  for (int w = 1; w < NWM; ++w) M = fmaxf(M, red[w]);
  const float f = m == CUKV_NEG_INF ? 0.0f : __expf(m - M);
  sums[warp][lane] = acc * f;
  if (lane == 0) red[NWM + warp] = l * f;
  __syncthreads();
  if (warp == 0) {
    float t = 0.0f, L = 0.0f;
#pragma unroll
    for (int w = 0; w < NWM; ++w) {
      t += sums[w][lane];
      L += red[NWM + w];
    }
    orow[lane] = M == CUKV_NEG_INF ? (u16)0 : f32_to_bf16(t / L);
    if (lane == 0 && lse_out != nullptr) *lse_out = M == CUKV_NEG_INF ? CUKV_NEG_INF : M + logf(L);
  }
}

// WIDE: the block merges (merge_wide) the 32 columns from 32 * (blockIdx.x % (D / 32)) of its task, so
// a batch-1 call spreads its merge over D/32 times more SMs.
template <int NWM, bool WIDE>
__device__ __forceinline__ void merge_partials(const float* __restrict__ arow, i64 astep,
                                               const float* __restrict__ mrow, const float* __restrict__ lrow,
                                               i64 mstep, int count, int D, u16* __restrict__ orow,
                                               float* __restrict__ lse_out) {
  if (WIDE) {
    const int c0 = 32 * (int)(blockIdx.x % (D / 32));
    merge_wide<NWM>(arow + c0, astep, mrow, lrow, mstep, count, orow + c0, c0 == 0 ? lse_out : nullptr);
    return;
  }
  if (D == 64) merge_task<2>(arow, astep, mrow, lrow, mstep, count, orow, lse_out);
  else if (D == 128) merge_task<4>(arow, astep, mrow, lrow, mstep, count, orow, lse_out);
  else merge_task<8>(arow, astep, mrow, lrow, mstep, count, orow, lse_out);
}

// The (lane, query head) task of this warp, or -1: WIDE, the block's task (D/32 blocks a task, one per
// 32 columns); else one task per warp (the host launches ceil(tasks / NWM) blocks).
template <int NWM, bool WIDE>
__device__ __forceinline__ i64 merge_task_of(i64 n_tasks, int D) {
  const i64 t = WIDE ? (i64)(blockIdx.x / (D / 32)) : (i64)blockIdx.x * NWM + (threadIdx.x >> 5);
  return t < n_tasks ? t : -1;
}

// Both merges are held to 128 registers (two blocks per SM): a block then fits beside a records CTA
// (H100 B1 T131072 fp8: 112 -> 111 us; no other bench shape moved).
// The split schedule: part_a float32 [B, S, N_H, D], part_ml float32 [B, 2, S, N_H].
template <int NWM, bool WIDE>
__global__ void __launch_bounds__(32 * NWM, 2) decode_attn_merge(const float* __restrict__ part_a,
    const float* __restrict__ part_ml, int n_lanes, int n_heads, int num_splits, int D, u16* __restrict__ out,
    float* __restrict__ lse) {
  pdl_trigger();   // the next call's decode kernel may launch (it waits for this grid first)
  const i64 bh = merge_task_of<NWM, WIDE>((i64)n_lanes * n_heads, D);
  if (bh < 0) return;
  const i64 b = bh / n_heads;
  const int h = (int)(bh - b * n_heads);
  const float* mrow = part_ml + (b * 2 + 0) * num_splits * (i64)n_heads + h;
  pdl_wait();
  merge_partials<NWM, WIDE>(part_a + (b * num_splits * n_heads + h) * (i64)D, (i64)n_heads * D, mrow,
                            mrow + num_splits * (i64)n_heads, n_heads, num_splits, D, out + bh * D, lse + bh);
}

// The stream schedule: lane b has its blocks [x0, x0 + nb) of all lanes' N blocks (nb = ceil(len_b /
// 16), x0 = the blocks of the lanes before it, both from the lengths, before the decode kernel ends);
// position stream k serves [k*N/PS, (k+1)*N/PS) (PS = min(n_streams, N)), so the partials of (lane b,
// item hy) are those of the streams K(x0) .. K(x0 + nb - 1), K(x) = ((x + 1) * PS - 1) / N, in slots
// (b + k) * n_items + hy of part_a [slots, hs, D] and part_ml [slots, 2, hs]. A lane without keys has no
// partials (out 0, lse -inf).
template <int NWM, bool WIDE>
__global__ void __launch_bounds__(32 * NWM, 2) decode_attn_merge_stream(const float* __restrict__ part_a,
    const float* __restrict__ part_ml, const int* __restrict__ seqlens, int n_lanes,
    int n_heads, int n_kv, int capacity, int D, int n_streams, u16* __restrict__ out, float* __restrict__ lse) {
  pdl_trigger();   // the next call's decode kernel may launch (it waits for this grid first)
  const i64 bh = merge_task_of<NWM, WIDE>((i64)n_lanes * n_heads, D);
  if (bh < 0) return;
  const int r = n_heads / n_kv, n_hg = (r + 15) >> 4, hs = min(16, r);
  const i64 n_items = n_kv * n_hg;
  auto sum_blocks = [&](int hi) {   // whole warp: the blocks of lanes [0, hi)
    i64 v = 0;
    for (int c = threadIdx.x & 31; c < hi; c += 32) v += (lane_keys(seqlens, c, capacity) + 15) >> 4;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(CUKV_FULL_MASK, v, off);
    return v;
  };
  // the partials (slot, count) of the task and its head in the slot, from the lengths only (before the wait)
  const int b = (int)(bh / n_heads), h = (int)(bh - (i64)b * n_heads);
  const int kvh = h / r, hy = kvh * n_hg + ((h - kvh * r) >> 4), hl = h - kvh * r;
  const i64 N = sum_blocks(n_lanes), PS = min((i64)n_streams, N), x0 = sum_blocks(b);
  const i64 nb = (lane_keys(seqlens, b, capacity) + 15) >> 4;
  i64 slot = 0;
  int count = 0;
  if (nb > 0) {
    const i64 k0 = ((x0 + 1) * PS - 1) / N, k1 = ((x0 + nb) * PS - 1) / N;
    slot = ((i64)b + k0) * n_items + hy;
    count = (int)(k1 - k0 + 1);
  }
  pdl_wait();
  const float* mrow = part_ml + slot * 2 * hs + (hl & 15);
  merge_partials<NWM, WIDE>(part_a + (slot * hs + (hl & 15)) * D, n_items * hs * D, mrow, mrow + hs,
                            n_items * 2 * hs, count, D, out + bh * D, lse + bh);
}
