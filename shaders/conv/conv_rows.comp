#version 450
// Implicit-GEMM convolution over aligned row segments: NC[D][H]W float32, any rank 1..3 (1-D and
// 2-D arrive with unit depth/height), groups, stride, dilation, bias and fused activation. The
// input is the zero-padded, row-aligned copy written by conv_pack.comp, or the input itself: for
// a 1x1 stride-1 convolution seen as one long row (a plain GEMM), and MASKED (input width a
// multiple of 4) with rows outside the input skipped and vec4s outside a row read as zeros, which
// saves the pack pass. Host code: vkconv/ops/conv/kernels.py.
//
// One invocation owns an MB output channels x PB output pixels register tile (PB consecutive
// pixels of one output row). For each input channel and kernel row it loads the input row segment
// those pixels need once, as SEGV aligned vec4s, and reuses it for all KW kernel columns: the
// column shift is a compile-time register selection, since KW, stride and dilation along W are
// specialization constants and the tap loops are unrolled. Weights are repacked at load as
// [group][oc block][cin][kd][kh][kw][MB], so each tap is MB/4 vec4 loads with no remainder, and an
// outer product of MB weights by PB pixels. No shared memory: lavapipe runs barriers and shared
// loads slowly, and texel fetches of both operands keep loads per FMA low (see conv_bindings.py).
//
// The LSTM variants (conv_rows_lstm*) store a ConvLSTM2D time step instead of a plain output: the
// output channels are the layer's gates ordered 4 * filter + gate (i, f, c, o), so with MB a
// multiple of 4 each acc vec4 holds the four recurrent pre-activations of one filter and pixel; the
// store adds the input gates, updates the cell state and writes h_t to the layer's output and, in
// the padded layout this kernel reads, to the next step's input (vkconv/ops/conv_lstm.py).
//
// The SHARED variants (conv_rows_shared*, SPIR-V 1.3) give the SG lanes of a subgroup one pixel
// tile and SG neighbouring output-channel blocks instead of SG tiles of one block: lane l loads
// vec4s l, l + SG, ... of each input row segment and the lanes hand them to each other by subgroup
// shuffles, so a row costs one gather per lane (two past SG vec4s) instead of SEGV; the weights
// stay per lane. The same sums in the same order as the plain variants: bitwise their results.
// Measured on lavapipe, both drivers (docs/PERFORMANCE.md): 0.91-0.99x the plain variant's time on
// VGG-16's Winograd layers of 128-512 input and 256-512 output channels, 1.02-1.06x at 64 input
// channels or one block per lane (with fewer blocks than lanes, lanes duplicate the last block).
//
// variant: conv_rows -DTEXEL=1
// variant: conv_rows_ssbo
// variant: conv_rows_lstm -DTEXEL=1 -DLSTM=1
// variant: conv_rows_lstm_ssbo -DLSTM=1
// variant: conv_rows_shared -DTEXEL=1 -DSHARED=1 --target-env=vulkan1.1
// variant: conv_rows_shared_ssbo -DSHARED=1 --target-env=vulkan1.1
#extension GL_EXT_samplerless_texture_functions : require  // textureBuffer: SPIR-V 1.6 forbids sampled Buffer images
#extension GL_GOOGLE_include_directive : require
#extension GL_EXT_control_flow_attributes : require
#include "activation.glsl"
#ifdef SHARED
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_shuffle : require
#endif

layout(local_size_x_id = 0, local_size_y = 1, local_size_z = 1) in;
#include "grid.glsl"  // after the local size: it reads gl_WorkGroupSize
layout(constant_id = 4) const int MB = 16;       // output channels per invocation, multiple of 4
layout(constant_id = 5) const int PB = 16;       // output pixels per invocation, multiple of 4
layout(constant_id = 6) const int KW = 3;        // kernel width
layout(constant_id = 7) const int SW = 1;        // stride along W
layout(constant_id = 8) const int DW = 1;        // dilation along W
layout(constant_id = 9) const bool VEC_OUT = false;  // out_w % 4 == 0: store vec4s of pixels
// Floats between neighbouring output pixels of a row: 1, or the stride of a strided store (one stride
// phase of a transposed convolution written straight into place, see vkconv/ops/conv_transpose.py)
layout(constant_id = 12) const int OUT_SX = 1;
layout(constant_id = 14) const int SG = 8;  // SHARED: the subgroup size (the local size a multiple of it)
layout(constant_id = 15) const int KU = 1;  // input rows per step of the row loop
const int MV = MB / 4;

#ifdef TEXEL
layout(binding = 0) uniform textureBuffer xp;
layout(binding = 1) uniform textureBuffer wp;
#define LOAD_X(i) texelFetch(xp, i)
#define LOAD_W(i) texelFetch(wp, i)
#else
layout(std430, binding = 0) readonly buffer Padded { vec4 xp[]; };
layout(std430, binding = 1) readonly buffer Weight { vec4 wp[]; };
#define LOAD_X(i) xp[i]
#define LOAD_W(i) wp[i]
#endif
#include "row_segment.glsl"
const int SEGV = (SHIFT + (PB - 1) * SW + (KW - 1) * DW + 4) / 4;  // vec4s in one input row segment
#ifdef LSTM
// The recurrent activation of the i, f, o gates: ACT_SIGMOID, or ACT_HARD_SIGMOID with (rec_a, rec_b).
layout(constant_id = 13) const int REC_ACT = ACT_SIGMOID;
// Input-convolution gates, bias added: [N][T][4F][out_h * out_w], channel 4 * filter + gate
layout(std430, binding = 2) readonly buffer Gates { float gx[]; };
// h_t: the layer's output at n * y_n + y_off + f * out_h * out_w + pixel
layout(std430, binding = 3) writeonly buffer Output { float y[]; };
// The cell state [N][F][out_h * out_w]: each element read and written by one invocation only
layout(std430, binding = 4) buffer Cell { float cell[]; };
// h_t again, in xp's padded layout (zeros around the image stay as they are): the next step's input
layout(std430, binding = 5) writeonly buffer Hidden { float hidden[]; };
#else
// [group][oc block][MB] as vec4, zero-padded like the weights
layout(std430, binding = 2) readonly buffer Bias { vec4 bias[]; };
layout(std430, binding = 3) writeonly buffer Output { vec4 y[]; };
#endif

layout(push_constant) uniform Params {
    int cin_g, cout_g, groups, oc_blocks;
    int pd, ph, pw4;               // padded input: depth, height, width / 4 (MASKED: the input's)
    int pad_d, pad_h, pad_w;       // MASKED only: zeros before the input along each axis
    int k_d, k_h, s_d, s_h, d_d, d_h;
    int out_d, out_h, out_w, tiles_w;  // tiles_w = ceil(out_w / PB)
    float act_a, act_b;
    // where the output goes: channel c's pixel (z, y, x) at c * y_plane + y_off + z * y_sz + y * y_sy
    // + x * OUT_SX (a dense output: out_d * out_h * out_w, 0, out_h * out_w, out_w)
    int y_plane, y_off, y_sz, y_sy;
#ifdef LSTM
    // gx of batch item n, this step at n * gx_n + gx_off; h_t at n * y_n + y_off; has_state == 0:
    // h_{t-1} = c_{t-1} = 0 (the first step without an initial state: the convolution is skipped).
    // The pads (pad_h, pad_w) are where xp's padded layout places the image, for the hidden store.
    int gx_n, gx_off, y_n, has_state;
    float rec_a, rec_b;
#endif
} p;

void main()
{
    const int tiles = p.tiles_w * p.out_h * p.out_d;
#ifdef SHARED
    // Subgroups run over (tile, group of SG oc blocks), lane l holding block l of its group; lanes
    // past the last block compute a copy of it (so every lane takes part in the shuffles) and
    // store nothing.
    const int lane = int(gl_SubgroupInvocationID);
    const int sgid = flat_group() * int(gl_NumSubgroups) + int(gl_SubgroupID);
    const int ocb_groups = (p.oc_blocks + SG - 1) / SG;
    const int tile = sgid / ocb_groups;
    if (tile >= tiles) return;  // the whole subgroup
    const int ocb_raw = (sgid - tile * ocb_groups) * SG + lane;
    const bool ocb_ok = ocb_raw < p.oc_blocks;
    const int ocb = min(ocb_raw, p.oc_blocks - 1);
    const int SEGS = (SEGV + SG - 1) / SG;  // vec4s each lane loads per row segment
#else
    // Invocations run over (oc block, tile) with the tile fastest: neighbouring invocations
    // share weights, and a small image still fills whole SIMD groups (lavapipe runs 8 at a time).
    const int id = flat_invocation();
    if (id >= tiles * p.oc_blocks) return;
    const int tile = id % tiles;
    const int ocb = id / tiles;
#endif
    const int ng = int(gl_WorkGroupID.z);  // n * groups + g
    const int g = ng % p.groups;
    const int ox0 = (tile % p.tiles_w) * PB;
    const int oy = (tile / p.tiles_w) % p.out_h;
    const int oz = tile / (p.tiles_w * p.out_h);

    const int row = p.pw4, slice = p.ph * p.pw4, plane = p.pd * slice;
    const int col4 = (ox0 * SW - p.pad_w - SHIFT) / 4;  // MASKED: exact, a multiple of 4
    const int iz0 = MASKED ? oz * p.s_d - p.pad_d : oz * p.s_d;
    const int iy0 = MASKED ? oy * p.s_h - p.pad_h : oy * p.s_h;
    const int xc = ng * p.cin_g * plane + iz0 * slice + iy0 * row + (MASKED ? col4 : (ox0 * SW) / 4);
    int wi = (g * p.oc_blocks + ocb) * p.cin_g * p.k_d * p.k_h * KW * MV;

    vec4 acc[PB][MV];
    [[unroll]] for (int j = 0; j < PB; ++j)
        [[unroll]] for (int m = 0; m < MV; ++m) acc[j][m] = vec4(0.0);

    // One flat loop over (input channel, kz, ky) rows: lavapipe masks every value written inside
    // nested runtime loops, which made the (ci, kz, ky) nest 2.5x slower than this.
#ifdef LSTM
    const int rows = p.has_state != 0 ? p.cin_g * p.k_d * p.k_h : 0;
#else
    const int rows = p.cin_g * p.k_d * p.k_h;
#endif
    const int step_y = p.d_h * row;
    const int jump_z = p.d_d * slice - p.k_h * step_y;   // last ky -> next kz
    const int jump_c = plane - p.k_d * p.d_d * slice;    // last kz -> next input channel
    // Row 0 of this tile's first input plane: a valid address to read for rows that add nothing
    const int safe = xc - iz0 * slice - iy0 * row;
    int xr = xc, ky = 0, kz = 0, iy = iy0, iz = iz0;
    for (int r = 0; r < rows; r += KU) {
        // KU rows a step, each accumulator updated KU times in a row: the register tile exceeds
        // the CPU's registers, so every update loads and stores it, and KU updates per load and
        // store took 0.65-0.85x the time of one on 1x1 GEMMs (docs/PERFORMANCE.md). A row past the
        // last, or (MASKED) outside the input, is read as zeros and adds nothing (fma(0, w, a) == a);
        // with one row a step such a row is skipped instead (a 3x3 stride-2 layer took 1.05x with
        // the zeros).
        bool live[KU];
        int at[KU], wr[KU];  // each row's first input and weight vec4 (valid addresses for every row)
        [[unroll]] for (int u = 0; u < KU; ++u) {
            live[u] = r + u < rows && (!MASKED || (uint(iy) < uint(p.ph) && uint(iz) < uint(p.pd)));
            at[u] = live[u] ? xr : safe;
            wr[u] = r + u < rows ? wi + u * KW * MV : wi;
            // Next row without branches: ky, then kz, then the input channel wrap around.
            ++ky;
            xr += step_y;
            iy += p.d_h;
            const bool wrap_y = ky == p.k_h;
            ky = wrap_y ? 0 : ky;
            kz += wrap_y ? 1 : 0;
            xr += wrap_y ? jump_z : 0;
            iy = wrap_y ? iy0 : iy;
            iz += wrap_y ? p.d_d : 0;
            const bool wrap_z = kz == p.k_d;
            kz = wrap_z ? 0 : kz;
            xr += wrap_z ? jump_c : 0;
            iz = wrap_z ? iz0 : iz;
        }
        wi += KU * KW * MV;
        if (KU == 1 && !live[0])
            continue;
        vec4 seg[KU][SEGV];
        [[unroll]] for (int u = 0; u < KU; ++u) {
#ifdef SHARED
            vec4 mine[SEGS];
            [[unroll]] for (int k = 0; k < SEGS; ++k) mine[k] = segment_vec4(at[u], min(k * SG + lane, SEGV - 1), col4, p.pw4);
            [[unroll]] for (int v = 0; v < SEGV; ++v) seg[u][v] = subgroupShuffle(mine[v / SG], v % SG);
#else
            [[unroll]] for (int v = 0; v < SEGV; ++v) seg[u][v] = segment_vec4(at[u], v, col4, p.pw4);
#endif
            if (KU > 1 && !live[u]) [[unroll]] for (int v = 0; v < SEGV; ++v) seg[u][v] = vec4(0.0);
        }
        [[unroll]] for (int kx = 0; kx < KW; ++kx) {
            vec4 wv[KU][MV];
            [[unroll]] for (int u = 0; u < KU; ++u)
                [[unroll]] for (int m = 0; m < MV; ++m) wv[u][m] = LOAD_W(wr[u] + kx * MV + m);
            [[unroll]] for (int j = 0; j < PB; ++j) {
                const int e = SHIFT + j * SW + kx * DW;
                [[unroll]] for (int m = 0; m < MV; ++m)
                    [[unroll]] for (int u = 0; u < KU; ++u) acc[j][m] = fma(vec4(seg[u][e >> 2][e & 3]), wv[u][m], acc[j][m]);
            }
        }
    }

    const int oc0 = ocb * MB;
#ifdef LSTM
    // 2-D, one group: ng is the batch item, channel 4 * f + gate, acc[j][m] = filter oc0 / 4 + m.
    const int hw = p.out_h * p.out_w, filters = p.cout_g / 4, pix = oy * p.out_w + ox0;
    const int hrow = 4 * p.pw4, hplane = p.ph * hrow;
    [[unroll]] for (int m = 0; m < MV; ++m) {
        const int f = oc0 / 4 + m;
        if (f >= filters) break;
        const int gi = ng * p.gx_n + p.gx_off + 4 * f * hw + pix;
        const int ci = (ng * filters + f) * hw + pix;
        const int yi = ng * p.y_n + p.y_off + f * hw + pix;
        const int hi = (ng * filters + f) * hplane + (oy + p.pad_h) * hrow + p.pad_w + ox0;
        [[unroll]] for (int j = 0; j < PB; ++j) {
            if (ox0 + j >= p.out_w) break;
            const vec4 g = acc[j][m] + vec4(gx[gi + j], gx[gi + hw + j], gx[gi + 2 * hw + j], gx[gi + 3 * hw + j]);
            const float c_prev = p.has_state != 0 ? cell[ci + j] : 0.0;
            const float c = activate_kind(REC_ACT, g.y, p.rec_a, p.rec_b) * c_prev
                          + activate_kind(REC_ACT, g.x, p.rec_a, p.rec_b) * activate(g.z, p.act_a, p.act_b);
            const float h = activate_kind(REC_ACT, g.w, p.rec_a, p.rec_b) * activate(c, p.act_a, p.act_b);
            cell[ci + j] = c;
            y[yi + j] = h;
            hidden[hi + j] = h;
        }
    }
#else
#ifdef SHARED
    if (!ocb_ok) return;
#endif
    const int y0 = (ng * p.cout_g + oc0) * p.y_plane + p.y_off + oz * p.y_sz + oy * p.y_sy + ox0 * OUT_SX;
    const int bias0 = (g * p.oc_blocks + ocb) * MV;
    [[unroll]] for (int m = 0; m < MV; ++m) {
        const vec4 b = bias[bias0 + m];
        [[unroll]] for (int c = 0; c < 4; ++c) {
            if (oc0 + m * 4 + c >= p.cout_g) break;
            const int yc = y0 + (m * 4 + c) * p.y_plane;
            if (VEC_OUT) {
                // Rows start at multiples of 4 (out_w % 4 == 0), so pixels go out as whole vec4s.
                [[unroll]] for (int j = 0; j < PB; j += 4) {
                    if (ox0 + j >= p.out_w) break;
                    const vec4 r = vec4(acc[j][m][c], acc[j + 1][m][c], acc[j + 2][m][c], acc[j + 3][m][c]);
                    y[(yc + j) >> 2] = activate4(r + b[c], p.act_a, p.act_b);
                }
            } else {
                [[unroll]] for (int j = 0; j < PB; ++j) {
                    if (ox0 + j >= p.out_w) break;
                    const int at = yc + j * OUT_SX;
                    y[at >> 2][at & 3] = activate(acc[j][m][c] + b[c], p.act_a, p.act_b);
                }
            }
        }
    }
#endif
}
