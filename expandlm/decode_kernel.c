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
 */
#include <math.h>
#include <stddef.h>

typedef struct {
    int dim, hidden, layers, heads, kv_heads, head_dim, vocab, context, slots;
    float eps;
    const float *embed, *head, *norm, *cos, *sin;
    const float *const *attn_norm, *const *wqkv, *const *wo, *const *ffn_norm, *const *wgate_up, *const *wdown;
    float *k_cache, *v_cache;
} Model;

/* out[b][i] = sum_j w[i][j] x[b][j]  (+= when accumulate). Each weight row is read once for all B rows,
 * four rows of x at a time (four independent sums, one load of w[i][j] for the four); a single row
 * is run.c's loop. (Four weight rows at a time instead measured slower here.) */
static void matmul(float *out, const float *x, const float *w, int B, int n, int d, int accumulate) {
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

/* scratch: at least B * (3 * dim + q + 2 * kv + 2 * hidden + context) floats */
void decode_step(const Model *m, int B, const int *slots, const int *tokens, const int *positions,
                 float *logits, float *scratch) {
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
                const int g = hh / (H / KV);
                const float *qh = q + (size_t)hh * hd;
                float mx = -3.0e38f;  /* not -INFINITY: -ffast-math assumes finite values */
                for (int t = 0; t <= pos; t++) {
                    const float *kt = kc + (size_t)t * kv_size + (size_t)g * hd;
                    float dot = 0.0f;
                    for (int i = 0; i < hd; i++) dot += qh[i] * kt[i];
                    scores[t] = dot * scale;
                    if (scores[t] > mx) mx = scores[t];
                }
                float sum = 0.0f;
                for (int t = 0; t <= pos; t++) { scores[t] = expf(scores[t] - mx); sum += scores[t]; }
                float *out = att + (size_t)b * D + (size_t)hh * hd;
                for (int i = 0; i < hd; i++) out[i] = 0.0f;
                for (int t = 0; t <= pos; t++) {
                    const float p = scores[t] / sum, *vt = vc + (size_t)t * kv_size + (size_t)g * hd;
                    for (int i = 0; i < hd; i++) out[i] += p * vt[i];
                }
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
    matmul(logits, h, m->head, B, D, m->vocab, 0);
}

/* Up to n greedy steps of one sequence from `token` at `pos`, stopping after `eos`: the next token is
 * the first largest logit (as torch.argmax picks it). Returns the number of tokens written to out. */
int decode_greedy(const Model *m, int slot, int token, int pos, int n, int eos, int *out, float *logits,
                  float *scratch) {
    int made = 0;
    while (made < n && pos < m->context) {
        decode_step(m, 1, &slot, &token, &pos, logits, scratch);
        int best = 0;
        for (int v = 1; v < m->vocab; v++) if (logits[v] > logits[best]) best = v;
        out[made++] = best;
        token = best;
        pos++;
        if (best == eos) break;
    }
    return made;
}
