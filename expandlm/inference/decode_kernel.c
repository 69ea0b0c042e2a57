/* One decode step of a Llama model for B sequences, in plain C: what `expandlm.engine` runs per token.
 *
 * Why C: at these sizes a token costs a few hundred microseconds of arithmetic, and a PyTorch loop
 * spends more than that dispatching its ~20 operations per block; llama2.c's run.c shows what a plain
 * loop compiled with -Ofast reaches. This is that loop over expandlm's (Hugging Face's) weights and
 * KV cache, batched: each weight row is read once for the B sequences of a step.
 *
 * Layouts are the engine's tensors (float32, contiguous): weights as torch.nn.Linear stores them
 * ([out, in]); wqkv = [q; k; v], wgate_up = [gate; up]; RoPE tables [context, head_dim] as
 * transformers computes them (rotate-half layout); caches [layers, slots, context, kv_heads, head_dim].
 * Compiled at first use with the system compiler (engine.py); no other dependency.
 *
 * A step of the smallest models (nano: 43k weights) takes a few microseconds, so what costs there is
 * not the arithmetic but the wait on each sum's chain of dependent adds and its horizontal add at the
 * end: the loops below keep several independent sums in flight (several rows at a time), and with AVX2
 * (-march=native where the CPU has it) add up eight rows' vector sums together. Without AVX2 the same
 * loops run in plain C.
 */
#include <math.h>
#include <stddef.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HAVE_AVX2 1
#endif

typedef struct {
    int dim, hidden, layers, heads, kv_heads, head_dim, vocab, context, slots;
    float eps;
    const float *embed, *head, *norm, *cos, *sin;
    const float *const *attn_norm, *const *wqkv, *const *wo, *const *ffn_norm, *const *wgate_up, *const *wdown;
    float *k_cache, *v_cache;
} Model;

/* out[i] = sum_j r_i[j] x[j] for d rows r_i = w + i * stride of n floats (+= when accumulate), from row
 * `first` on: four rows at a time, four independent sums in flight (one sum at a time waits on its
 * chain of adds, and at small n its final horizontal add costs as much as the row). */
static void dots_c(float *out, const float *x, const float *w, int first, int n, int d, size_t stride,
                   int accumulate) {
    int i = first;
    for (; i + 4 <= d; i += 4) {
        const float *w0 = w + (size_t)i * stride, *w1 = w0 + stride, *w2 = w1 + stride, *w3 = w2 + stride;
        float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
        for (int j = 0; j < n; j++) {
            const float xj = x[j];
            s0 += w0[j] * xj; s1 += w1[j] * xj; s2 += w2[j] * xj; s3 += w3[j] * xj;
        }
        if (accumulate) { out[i] += s0; out[i + 1] += s1; out[i + 2] += s2; out[i + 3] += s3; }
        else { out[i] = s0; out[i + 1] = s1; out[i + 2] = s2; out[i + 3] = s3; }
    }
    for (; i < d; i++) {
        const float *wi = w + (size_t)i * stride;
        float s = 0.0f;
        for (int j = 0; j < n; j++) s += wi[j] * x[j];
        if (accumulate) out[i] += s; else out[i] = s;
    }
}

/* dots_c from row 0; with AVX2 and n a multiple of 8, eight rows at a time, eight vector sums reduced
 * together (three rounds of hadd for the eight). A weight matrix is stride = n; a head's cached keys
 * are stride = kv_size. */
static void dots(float *out, const float *x, const float *w, int n, int d, size_t stride, int accumulate) {
    int i = 0;
#ifdef HAVE_AVX2
    if (n % 8 == 0)
        for (; i + 8 <= d; i += 8) {
            const float *r = w + (size_t)i * stride;
            __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0, s4 = s0, s5 = s0, s6 = s0, s7 = s0;
            for (int j = 0; j < n; j += 8) {
                const __m256 xj = _mm256_loadu_ps(x + j);
                s0 = _mm256_fmadd_ps(_mm256_loadu_ps(r + j), xj, s0);
                s1 = _mm256_fmadd_ps(_mm256_loadu_ps(r + stride + j), xj, s1);
                s2 = _mm256_fmadd_ps(_mm256_loadu_ps(r + 2 * stride + j), xj, s2);
                s3 = _mm256_fmadd_ps(_mm256_loadu_ps(r + 3 * stride + j), xj, s3);
                s4 = _mm256_fmadd_ps(_mm256_loadu_ps(r + 4 * stride + j), xj, s4);
                s5 = _mm256_fmadd_ps(_mm256_loadu_ps(r + 5 * stride + j), xj, s5);
                s6 = _mm256_fmadd_ps(_mm256_loadu_ps(r + 6 * stride + j), xj, s6);
                s7 = _mm256_fmadd_ps(_mm256_loadu_ps(r + 7 * stride + j), xj, s7);
            }
            /* lo = [half sums of rows 0..3 | other half sums of rows 0..3], hi the same for rows 4..7 */
            const __m256 lo = _mm256_hadd_ps(_mm256_hadd_ps(s0, s1), _mm256_hadd_ps(s2, s3));
            const __m256 hi = _mm256_hadd_ps(_mm256_hadd_ps(s4, s5), _mm256_hadd_ps(s6, s7));
            __m256 sums = _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
            if (accumulate) sums = _mm256_add_ps(sums, _mm256_loadu_ps(out + i));
            _mm256_storeu_ps(out + i, sums);
        }
#endif
    dots_c(out, x, w, i, n, d, stride, accumulate);
}

/* out[i] = sum_t p[t] v_t[i] over n rows v_t = v + t * stride of hd floats: four rows at a time (in
 * plain C, out is read and written once per four rows: each update waits on the store of the last);
 * with AVX2, out's vector in registers for all the rows, four sums in flight. */
static void weighted_sum(float *out, const float *p, const float *v, int n, int hd, size_t stride) {
    int i = 0;
#ifdef HAVE_AVX2
    for (; i + 8 <= hd; i += 8) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        int t = 0;
        for (; t + 4 <= n; t += 4) {
            const float *vt = v + (size_t)t * stride + i;
            a0 = _mm256_fmadd_ps(_mm256_set1_ps(p[t]), _mm256_loadu_ps(vt), a0);
            a1 = _mm256_fmadd_ps(_mm256_set1_ps(p[t + 1]), _mm256_loadu_ps(vt + stride), a1);
            a2 = _mm256_fmadd_ps(_mm256_set1_ps(p[t + 2]), _mm256_loadu_ps(vt + 2 * stride), a2);
            a3 = _mm256_fmadd_ps(_mm256_set1_ps(p[t + 3]), _mm256_loadu_ps(vt + 3 * stride), a3);
        }
        for (; t < n; t++) a0 = _mm256_fmadd_ps(_mm256_set1_ps(p[t]), _mm256_loadu_ps(v + (size_t)t * stride + i), a0);
        _mm256_storeu_ps(out + i, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    }
#endif
    if (i == hd) return;
    for (int j = i; j < hd; j++) out[j] = 0.0f;
    int t = 0;
    for (; t + 4 <= n; t += 4) {
        const float *v0 = v + (size_t)t * stride, *v1 = v0 + stride, *v2 = v1 + stride, *v3 = v2 + stride;
        for (int j = i; j < hd; j++) out[j] += p[t] * v0[j] + p[t + 1] * v1[j] + p[t + 2] * v2[j] + p[t + 3] * v3[j];
    }
    for (; t < n; t++)
        for (int j = i; j < hd; j++) out[j] += p[t] * v[(size_t)t * stride + j];
}

/* out[b][i] = sum_j w[i][j] x[b][j]  (+= when accumulate). Each weight row is read once for all B rows,
 * four rows of x at a time (four independent sums, one load of w[i][j] for the four); two or four weight
 * rows at a time as well measured slower for batched steps. One row: dots. */
const int row_block = 4;  /* the rows of x per load of a weight row (x0..x3 below); engine.py reads it */
static void matmul(float *out, const float *x, const float *w, int B, int n, int d, int accumulate) {
    if (B == 1) { dots(out, x, w, n, d, n, accumulate); return; }
    for (int i = 0; i < d; i++) {
        const float *wi = w + (size_t)i * n;
        int b = 0;
        for (; b + 4 <= B; b += 4) {
            const float *x0 = x + (size_t)b * n, *x1 = x0 + n, *x2 = x1 + n, *x3 = x2 + n;
            float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
            for (int j = 0; j < n; j++) {
                const float wj = wi[j];
                s0 += wj * x0[j]; s1 += wj * x1[j]; s2 += wj * x2[j]; s3 += wj * x3[j];
            }
            float *o = out + (size_t)b * d + i;
            if (accumulate) { o[0] += s0; o[d] += s1; o[2 * d] += s2; o[3 * d] += s3; }
            else { o[0] = s0; o[d] = s1; o[2 * d] = s2; o[3 * d] = s3; }
        }
        for (; b < B; b++) {
            const float *xb = x + (size_t)b * n;
            float s = 0.0f;
            for (int j = 0; j < n; j++) s += wi[j] * xb[j];
            if (accumulate) out[(size_t)b * d + i] += s; else out[(size_t)b * d + i] = s;
        }
    }
}

static void rmsnorm(float *out, const float *x, const float *w, int n, float eps) {
    float ss = 0.0f;
    for (int j = 0; j < n; j++) ss += x[j] * x[j];
    float inv = 1.0f / sqrtf(ss / n + eps);
    for (int j = 0; j < n; j++) out[j] = w[j] * (x[j] * inv);
}

/* x * cos + rotate_half(x) * sin, per head */
static void rope(float *x, int n_heads, int hd, const float *cos, const float *sin) {
    int half = hd / 2;
    for (int h = 0; h < n_heads; h++) {
        float *v = x + (size_t)h * hd;
        for (int i = 0; i < half; i++) {
            float a = v[i], b = v[i + half];
            v[i] = a * cos[i] - b * sin[i];
            v[i + half] = b * cos[i + half] + a * sin[i + half];
        }
    }
}

/* One head's attention over n cached positions (keys and values `stride` floats apart):
 * softmax(q.k * scale) weighted sum of the values, into out. */
static void attend(float *out, const float *q, const float *k, const float *v, int n, int stride, int hd,
                   float scale, float *scores) {
    dots(scores, q, k, hd, n, stride, 0);
    float mx = -3.0e38f;  /* not -INFINITY: -ffast-math assumes finite values */
    for (int t = 0; t < n; t++) { scores[t] *= scale; mx = scores[t] > mx ? scores[t] : mx; }
    float sum = 0.0f;
    for (int t = 0; t < n; t++) { scores[t] = expf(scores[t] - mx); sum += scores[t]; }
    for (int t = 0; t < n; t++) scores[t] /= sum;
    weighted_sum(out, scores, v, n, hd, stride);
}

/* The blocks for B rows: row b is token tokens[b] at position positions[b] of cache row slots[b]. Each
 * row's keys and values are written to the cache before it attends, and rows run in order, so rows of
 * one slot at consecutive positions see each other causally (a prompt: `prefill`). Leaves the final
 * norm of each row in h (scratch + B * dim).
 * scratch: at least B * (3 * dim + q + 2 * kv + 3 * hidden) + context floats */
static float *blocks(const Model *m, int B, const int *slots, const int *tokens, const int *positions,
                     float *scratch) {
    const int D = m->dim, H = m->heads, KV = m->kv_heads, hd = m->head_dim, F = m->hidden;
    const int q_size = H * hd, kv_size = KV * hd, qkv_size = q_size + 2 * kv_size;
    const float scale = 1.0f / sqrtf((float)hd);
    float *x = scratch, *h = x + (size_t)B * D, *att = h + (size_t)B * D, *qkv = att + (size_t)B * D;
    float *gu = qkv + (size_t)B * qkv_size, *act = gu + (size_t)B * 2 * F, *scores = act + (size_t)B * F;
    const size_t row = (size_t)m->context * kv_size, layer = (size_t)m->slots * row;

    for (int b = 0; b < B; b++)
        for (int j = 0; j < D; j++) x[(size_t)b * D + j] = m->embed[(size_t)tokens[b] * D + j];

    for (int l = 0; l < m->layers; l++) {
        for (int b = 0; b < B; b++) rmsnorm(h + (size_t)b * D, x + (size_t)b * D, m->attn_norm[l], D, m->eps);
        matmul(qkv, h, m->wqkv[l], B, D, qkv_size, 0);
        for (int b = 0; b < B; b++) {
            float *q = qkv + (size_t)b * qkv_size, *k = q + q_size, *v = k + kv_size;
            const int pos = positions[b];
            const float *c = m->cos + (size_t)pos * hd, *s = m->sin + (size_t)pos * hd;
            rope(q, H, hd, c, s);
            rope(k, KV, hd, c, s);
            float *kc = m->k_cache + l * layer + slots[b] * row, *vc = m->v_cache + l * layer + slots[b] * row;
            for (int j = 0; j < kv_size; j++) {
                kc[(size_t)pos * kv_size + j] = k[j];
                vc[(size_t)pos * kv_size + j] = v[j];
            }
            for (int hh = 0; hh < H; hh++) {
                const size_t g = (size_t)(hh / (H / KV)) * hd;
                attend(att + (size_t)b * D + (size_t)hh * hd, q + (size_t)hh * hd, kc + g, vc + g, pos + 1,
                       kv_size, hd, scale, scores);
            }
        }
        matmul(x, att, m->wo[l], B, q_size, D, 1);
        for (int b = 0; b < B; b++) rmsnorm(h + (size_t)b * D, x + (size_t)b * D, m->ffn_norm[l], D, m->eps);
        matmul(gu, h, m->wgate_up[l], B, D, 2 * F, 0);
        for (int b = 0; b < B; b++) {
            const float *gate = gu + (size_t)b * 2 * F, *up = gate + F;
            for (int j = 0; j < F; j++) act[(size_t)b * F + j] = gate[j] / (1.0f + expf(-gate[j])) * up[j];
        }
        matmul(x, act, m->wdown[l], B, F, D, 1);
    }
    for (int b = 0; b < B; b++) rmsnorm(h + (size_t)b * D, x + (size_t)b * D, m->norm, D, m->eps);
    return h;
}

/* One decode step: the next-token logits [B][vocab] of B sequences, one new token each. */
void decode_step(const Model *m, int B, const int *slots, const int *tokens, const int *positions,
                 float *logits, float *scratch) {
    matmul(logits, blocks(m, B, slots, tokens, positions, scratch), m->head, B, m->dim, m->vocab, 0);
}

/* As decode_step, but the logits [vocab] of the last row only: a prompt is its tokens as the rows of one
 * pass (one slot, positions 0..n-1: causal, see `blocks`); engine.py sends prompts of up to row_block. */
void prefill(const Model *m, int B, const int *slots, const int *tokens, const int *positions, float *logits,
             float *scratch) {
    const float *h = blocks(m, B, slots, tokens, positions, scratch);
    dots(logits, h + (size_t)(B - 1) * m->dim, m->head, m->dim, m->vocab, m->dim, 0);
}

/* The first index of the largest value, as torch.argmax picks it: the maximum first, then where it is
 * (two loops the compiler vectorizes; one loop that tracks the index does not). */
static int argmax(const float *x, int n) {
    float mx = x[0];
    for (int v = 1; v < n; v++) mx = x[v] > mx ? x[v] : mx;
    for (int v = 0; v < n; v++) if (x[v] == mx) return v;
    return 0;
}

/* Up to n greedy steps of one sequence from `token` at `pos`, stopping after `eos`. Returns the number
 * of tokens written to out. */
int decode_greedy(const Model *m, int slot, int token, int pos, int n, int eos, int *out, float *logits,
                  float *scratch) {
    int made = 0;
    while (made < n && pos < m->context) {
        decode_step(m, 1, &slot, &token, &pos, logits, scratch);
        const int best = argmax(logits, m->vocab);
        out[made++] = best;
        token = best;
        pos++;
        if (best == eos) break;
    }
    return made;
}
