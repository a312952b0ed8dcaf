/* Fused masked optimizer steps and the one-pass mask update, for float32 tensors on the CPU.
 *
 * Built and loaded by lib/kernels/native.py (the system C compiler, -O3 -march=native -fopenmp
 * -fno-math-errno -fno-trapping-math: no errno or trap semantics, so the loops if-convert and
 * vectorize; IEEE rounding is kept, unlike -ffast-math).
 * Masks use lib/pruning/bitmask.py's bit-plane layout: for n entries and M = ceil(n / 8) bytes,
 * entry j * M + i is bit j of byte i. Each kernel walks the mask a chunk of bytes at a time and,
 * within a chunk, plane by plane, so every inner loop is contiguous (gcc vectorizes it) and each
 * tensor is read and written once.
 *
 * A pruned entry (bit 0) of the weight and of its moments is written as +0.0 whatever the
 * gradient holds, so the gradient itself is never masked in a separate pass.
 */
#include <math.h>
#include <stdint.h>

#define CHUNK 32768 /* mask bytes per task: 8 planes x 2048 entries of each tensor */

/* x where mask is all ones, +0.0 where it is 0: an integer AND, so gcc computes every value
 * unconditionally instead of turning the loads into masked loads (slow on AMD). NaN & 0 = +0.0. */
static inline float keep_or_zero(float x, uint32_t mask) {
    uint32_t u;
    __builtin_memcpy(&u, &x, sizeof u);
    u &= mask;
    __builtin_memcpy(&x, &u, sizeof x);
    return x;
}

static inline int64_t plane_end(int64_t base, int64_t i1, int64_t n) {
    return base + i1 <= n ? i1 : n - base; /* the last plane may be shorter */
}

/* The update rule of one entry, shared by the dense and the compact step so that both compute the same
 * floats: the kernels are built with -ffp-contract=off, so every operation rounds once, in this order,
 * whether gcc vectorizes the loop (dense) or not (compact). See harness_masked_step_f32 for the rules.
 * A macro over the caller's scalar parameters: gcc then unswitches `clip` and `decay_after` out of the
 * loop and vectorizes it as it did the loop written out (a struct of them halved the dense speed). */
#define UPDATE_ONE(P, G, M, V)                                                                      \
    do {                                                                                            \
        float gi_ = (G);                                                                            \
        const float bound_ = (V) * theta;                                                           \
        if (clip)                                                                                   \
            gi_ = gi_ * gi_ > bound_ ? copysignf(sqrtf(bound_), gi_) : gi_;                         \
        const float m_ = (M) + one_minus_b1 * (gi_ - (M));                                          \
        const float v_ = (V) * b2 + one_minus_b2 * gi_ * gi_;                                       \
        const float q_ = m_ / (sqrtf(v_) + eps);                                                    \
        (P) = decay_after ? ((P) + step * q_) * decay : (P) * decay + step * q_;                    \
        (M) = m_;                                                                                   \
        (V) = v_;                                                                                   \
    } while (0)

/* One masked Adam-family update of p, m, v in place, for both rules (the flags are loop-invariant,
 * so gcc unswitches them out of the loop):
 *   clip (released SPAM only): where g^2 > theta * v_prev, g = sign(g) * sqrt(theta * v_prev);
 *   m = lerp(m, g, 1 - b1); v = b2 v + (1 - b2) g^2; q = m / (sqrt(v) + eps);
 *   decay_after 0, torch's AdamW:  p = p * decay + step * q  (step = -lr / bc1 * bc2_sqrt and
 *                                  eps = eps * bc2_sqrt: m / (sqrt(v) / bc2_sqrt + eps) rescaled);
 *   decay_after 1, released SPAM:  p = (p + step * q) * decay  (the decay on the updated weights). */
void harness_masked_step_f32(float *restrict p, const float *restrict g, float *restrict m,
                             float *restrict v, const uint8_t *restrict packed, int64_t n, int clip,
                             float theta, int decay_after, float one_minus_b1, float b2,
                             float one_minus_b2, float step, float eps, float decay, int threads) {
    const int64_t M = (n + 7) / 8;
    const int64_t chunks = (M + CHUNK - 1) / CHUNK;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t i0 = c * CHUNK, i1 = i0 + CHUNK < M ? i0 + CHUNK : M;
        for (int j = 0; j < 8; j++) {
            const int64_t base = (int64_t)j * M, end = plane_end(base, i1, n);
            float *restrict pj = p + base, *restrict mj = m + base, *restrict vj = v + base;
            const float *restrict gj = g + base;
            const uint8_t bit = (uint8_t)(1u << j);
            for (int64_t i = i0; i < end; i++) {
                const uint32_t keep = -(uint32_t)((packed[i] & bit) != 0);
                float pi = pj[i], mi = mj[i], vi = vj[i]; /* a pruned entry's outputs are +0.0 below */
                UPDATE_ONE(pi, gj[i], mi, vi);
                pj[i] = keep_or_zero(pi, keep);
                mj[i] = keep_or_zero(mi, keep);
                vj[i] = keep_or_zero(vi, keep);
            }
        }
    }
}

/* One mask update for one tensor, in one pass: keep = score > cut and w != 0 (a weight already
 * exactly zero stays pruned), bits packed into `packed`, pruned entries of w and of each tensor
 * in `zero` (optimizer state shaped like w) set to +0.0. `score` NULL means |w|. Returns the
 * number of entries kept. */
int64_t harness_mask_update_f32(const float *restrict score, float cut, float *restrict w,
                                float *const *zero, int nzero, uint8_t *restrict packed,
                                int64_t n, int threads) {
    const int64_t M = (n + 7) / 8;
    const int64_t chunks = (M + CHUNK - 1) / CHUNK;
    int64_t kept = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(+ : kept)
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t i0 = c * CHUNK, i1 = i0 + CHUNK < M ? i0 + CHUNK : M;
        for (int64_t i = i0; i < i1; i++)
            packed[i] = 0;
        for (int j = 0; j < 8; j++) {
            const int64_t base = (int64_t)j * M, end = plane_end(base, i1, n);
            float *restrict wj = w + base;
            const float *sj = score ? score + base : 0;
            for (int64_t i = i0; i < end; i++) {
                const float s = score ? sj[i] : fabsf(wj[i]);
                const int keep = (s > cut) & (wj[i] != 0.0f);
                packed[i] |= (uint8_t)(keep << j);
                wj[i] = keep_or_zero(wj[i], -(uint32_t)keep);
                kept += keep;
            }
            for (int z = 0; z < nzero; z++) {
                float *restrict tj = zero[z] + base;
                for (int64_t i = i0; i < end; i++)
                    tj[i] = keep_or_zero(tj[i], -(uint32_t)((packed[i] >> j) & 1));
            }
        }
    }
    return kept;
}

/* The sampled threshold's gather: block b of tensor t (picks, tensor after tensor, `counts[t]` each)
 * is copied whole, `width` floats, into `out`, in order. Parallel, with the blocks a few draws ahead
 * prefetched: each draw is a random read, so the time is memory latency, not bandwidth. Every tensor's
 * size is a multiple of `width` (the caller checks). */
void harness_gather_blocks_f32(const float *const *bases, const int64_t *counts, int ntensors,
                               const int64_t *restrict picks, int64_t width, float *restrict out,
                               int threads) {
    const int64_t ahead = 16;
#pragma omp parallel num_threads(threads)
    {
        int64_t offset = 0;
        for (int t = 0; t < ntensors; t++) {
            const float *src = bases[t];
            const int64_t *tp = picks + offset, count = counts[t];
#pragma omp for schedule(static) nowait
            for (int64_t b = 0; b < count; b++) {
                if (b + ahead < count) {
                    const char *next = (const char *)(src + tp[b + ahead] * width);
                    for (int64_t line = 0; line < width * (int64_t)sizeof(float); line += 64)
                        __builtin_prefetch(next + line);
                }
                const float *from = src + tp[b] * width;
                float *to = out + (offset + b) * width;
                for (int64_t k = 0; k < width; k++)
                    to[k] = from[k];
            }
            offset += count;
        }
    }
}

/* The compact step: the same rule for the kept entries only, with exp_avg and exp_avg_sq stored for
 * them alone, in flat order (lib/optim/compact.py). No index per entry: offsets[j * chunks + c] is
 * the number of kept entries before plane j's part of chunk c (chunk = `chunk` mask bytes), so each
 * task finds its place in m and v, then walks its mask 64 entries at a time, visiting only the set
 * bits. A pruned entry is neither read nor written: its weight is already +0.0 and stays so. */
static inline uint64_t plane_bits64(const uint8_t *bytes, int j) {
    uint64_t word = 0;
    for (int b = 0; b < 8; b++) {
        uint64_t x;
        __builtin_memcpy(&x, bytes + 8 * b, sizeof x);
        x = (x >> j) & 0x0101010101010101ULL; /* bit j of each byte, at bit 0 of that byte */
        word |= ((x * 0x0102040810204080ULL) >> 56) << (8 * b); /* byte k's bit to bit k */
    }
    return word;
}

void harness_compact_step_f32(float *restrict p, const float *restrict g, float *restrict m,
                              float *restrict v, const uint8_t *restrict packed,
                              const int64_t *restrict offsets, int64_t n, int64_t chunk, int clip,
                              float theta, int decay_after, float one_minus_b1, float b2,
                              float one_minus_b2, float step, float eps, float decay, int threads) {
    const int64_t M = (n + 7) / 8;
    const int64_t chunks = (M + chunk - 1) / chunk;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t i0 = c * chunk, i1 = i0 + chunk < M ? i0 + chunk : M;
        for (int j = 0; j < 8; j++) {
            const int64_t base = (int64_t)j * M, end = plane_end(base, i1, n);
            float *pj = p + base;
            const float *gj = g + base;
            int64_t k = offsets[j * chunks + c], i = i0;
            for (; i + 64 <= end; i += 64) {
                for (uint64_t w = plane_bits64(packed + i, j); w; w &= w - 1) {
                    const int64_t at = i + __builtin_ctzll(w);
                    UPDATE_ONE(pj[at], gj[at], m[k], v[k]);
                    k++;
                }
            }
            for (; i < end; i++) {
                if ((packed[i] >> j) & 1) {
                    UPDATE_ONE(pj[i], gj[i], m[k], v[k]);
                    k++;
                }
            }
        }
    }
}
