"""Metal Shading Language bodies of the bias-free int4 expert kernels, as `mx.fast.metal_kernel` takes them.

The same text compiles as C++ against `emu/metal_shim.h`: that is how it is tested off Apple hardware.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Kernel:
    """One kernel: its name, the names of its buffers, a header of helpers and the body."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    source: str
    header: str = ""


# The release's format: value = (u - 8) * scale, u a nibble of a packed uint32 word (element 8j+i
# in bits [4i, 4i+4) of word j), one scale per group of 32 inputs. A group is four words, so
# sum((u - 8) * scale * x) = scale * (sum(u * x) - 8 * sum(x)): no biases are read or stored.
HEADER = """
// The 32 nibbles of one group (four packed words, least significant first) dotted with 32 inputs.
inline float nibble_dot(const device uint4* w, thread const float* xv) {
    const uint4 q = *w;
    const uint words[4] = {q.x, q.y, q.z, q.w};
    float acc = 0.0f;
    for (int b = 0; b < 4; b++) {
        for (int n = 0; n < 8; n++) {
            acc += float((words[b] >> (4 * n)) & 0xfu) * xv[8 * b + n];
        }
    }
    return acc;
}
"""

# Rows of expert work come in windows of W (one threadgroup z index each). Within a window, runs
# of rows on the same slot (prefill sorts rows by expert) fetch each weight group once for all
# of them. A simdgroup owns ROWS output rows; lane l takes groups l, l + 32, ... of the input
# (four packed words and one scale each) and the lanes' partial sums meet in one simd_sum per
# output value. Packed rows are multiples of 16 bytes, so a group is one aligned uint4 load.
_PROLOGUE = """
    const uint lane = thread_index_in_simdgroup;
    const uint n_rows = dims[0];
    const uint n_out = dims[1];
    const uint n_in = dims[2];
    const uint G = n_in / 32;
    const uint row0 = (threadgroup_position_in_grid.y * SG + simdgroup_index_in_threadgroup) * ROWS;
    const uint r0 = threadgroup_position_in_grid.z * W;
    if (row0 >= n_out) {
        return;  // the whole simdgroup: no lane is left waiting in a simd_sum
    }
"""

GATE_UP_SOURCE = _PROLOGUE + """
    float acc_g[W][ROWS];
    float acc_u[W][ROWS];
    for (int t = 0; t < W; t++) {
        for (int r = 0; r < ROWS; r++) {
            acc_g[t][r] = 0.0f;
            acc_u[t][r] = 0.0f;
        }
    }
    uint begin = 0;
    while (begin < uint(W) && r0 + begin < n_rows) {
        const uint slot = slots[r0 + begin];
        uint end = begin + 1;
        while (end < uint(W) && r0 + end < n_rows && slots[r0 + end] == slot) {
            end++;
        }
        const device uint4* wg = (const device uint4*)gate_w + slot * n_out * G;
        const device uint4* wu = (const device uint4*)up_w + slot * n_out * G;
        const device S* sg = gate_s + slot * n_out * G;
        const device S* su = up_s + slot * n_out * G;
        for (uint g = lane; g < G; g += 32) {
            for (int t = 0; t < W; t++) {
                if (uint(t) < begin || uint(t) >= end) {
                    continue;
                }
                const device T* xr = x + tokens[r0 + t] * n_in + g * 32;
                float xv[32];
                float sx = 0.0f;
                for (int i = 0; i < 32; i++) {
                    xv[i] = float(xr[i]);
                    sx += xv[i];
                }
                for (int r = 0; r < ROWS; r++) {
                    const uint row = row0 + r;
                    if (row < n_out) {
                        const uint at = row * G + g;
                        acc_g[t][r] += float(sg[at]) * (nibble_dot(wg + at, xv) - 8.0f * sx);
                        acc_u[t][r] += float(su[at]) * (nibble_dot(wu + at, xv) - 8.0f * sx);
                    }
                }
            }
        }
        begin = end;
    }
    for (int t = 0; t < W; t++) {
        for (int r = 0; r < ROWS; r++) {
            const float gv = simd_sum(acc_g[t][r]);
            const float uv = simd_sum(acc_u[t][r]);
            const uint row = row0 + r;
            if (lane == 0 && r0 + t < n_rows && row < n_out) {
                // SwiGLU in float32: silu(gate) * up.
                act[(r0 + t) * n_out + row] = gv / (1.0f + metal::exp(-gv)) * uv;
            }
        }
    }
"""

DOWN_SOURCE = _PROLOGUE + """
    float acc[W][ROWS];
    for (int t = 0; t < W; t++) {
        for (int r = 0; r < ROWS; r++) {
            acc[t][r] = 0.0f;
        }
    }
    uint begin = 0;
    while (begin < uint(W) && r0 + begin < n_rows) {
        const uint slot = slots[r0 + begin];
        uint end = begin + 1;
        while (end < uint(W) && r0 + end < n_rows && slots[r0 + end] == slot) {
            end++;
        }
        const device uint4* wd = (const device uint4*)down_w + slot * n_out * G;
        const device S* sd = down_s + slot * n_out * G;
        for (uint g = lane; g < G; g += 32) {
            for (int t = 0; t < W; t++) {
                if (uint(t) < begin || uint(t) >= end) {
                    continue;
                }
                const device float* ar = act + (r0 + t) * n_in + g * 32;
                float xv[32];
                float sx = 0.0f;
                for (int i = 0; i < 32; i++) {
                    xv[i] = ar[i];
                    sx += xv[i];
                }
                const float rw = weights[r0 + t];  // the routing weight, applied in float32
                for (int r = 0; r < ROWS; r++) {
                    const uint row = row0 + r;
                    if (row < n_out) {
                        const uint at = row * G + g;
                        acc[t][r] += rw * float(sd[at]) * (nibble_dot(wd + at, xv) - 8.0f * sx);
                    }
                }
            }
        }
        begin = end;
    }
    if (SUM) {
        // Decode: the window is one token's k experts, summed into its output row.
        for (int r = 0; r < ROWS; r++) {
            float v = 0.0f;
            for (int t = 0; t < W; t++) {
                v += acc[t][r];
            }
            v = simd_sum(v);
            const uint row = row0 + r;
            if (lane == 0 && row < n_out) {
                y[threadgroup_position_in_grid.z * n_out + row] = static_cast<O>(v);
            }
        }
    } else {
        // Prefill: one weighted output row per expert row (the host sums a token's k rows).
        for (int t = 0; t < W; t++) {
            for (int r = 0; r < ROWS; r++) {
                const float v = simd_sum(acc[t][r]);
                const uint row = row0 + r;
                if (lane == 0 && r0 + t < n_rows && row < n_out) {
                    y[(r0 + t) * n_out + row] = static_cast<O>(v);
                }
            }
        }
    }
"""

# act[r, :] = silu(gate_{slot r} x[token r]) * up_{slot r} x[token r]; dims = (rows, moe_inter, hidden).
GATE_UP = Kernel("kimi_int4_gate_up_swiglu",
                 ("x", "gate_w", "gate_s", "up_w", "up_s", "slots", "tokens", "dims"),
                 ("act",), GATE_UP_SOURCE, HEADER)
# y = sum over a window (SUM) or per row of weights[r] * down_{slot r} act[r]; dims = (rows, hidden, moe_inter).
DOWN = Kernel("kimi_int4_down_combine",
              ("act", "down_w", "down_s", "slots", "weights", "dims"),
              ("y",), DOWN_SOURCE, HEADER)
