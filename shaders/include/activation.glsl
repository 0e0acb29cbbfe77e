// Fused activation epilogue shared by every op that writes a conv result.
// ACT is a specialization constant so the driver folds the switch away; the two
// parameters arrive as push constants so one pipeline serves every alpha/beta.
// A program of up to 8 more elementwise steps over constants may follow (POST_N).
#ifndef VKCONV_ACTIVATION_GLSL
#define VKCONV_ACTIVATION_GLSL

#define ACT_NONE 0
#define ACT_RELU 1
#define ACT_CLIP 2         // a = min, b = max
#define ACT_LEAKY_RELU 3   // a = alpha
#define ACT_HARD_SWISH 4   // x * clamp(x / 6 + 0.5, 0, 1), ONNX HardSwish
#define ACT_HARD_SIGMOID 5 // clamp(a * x + b, 0, 1)
#define ACT_SIGMOID 6
#define ACT_TANH 7

layout(constant_id = 3) const int ACT = ACT_NONE;

// NaN must survive Relu/Clip as it does in ONNX, so comparisons are written so that
// a NaN input takes the branch that returns it.  ``kind`` is a constant at every call site
// (ACT or another specialization constant), so the branches fold away.
float activate_kind(int kind, float v, float a, float b)
{
    if (kind == ACT_RELU) return v < 0.0 ? 0.0 : v;
    if (kind == ACT_CLIP) return v < a ? a : (v > b ? b : v);
    if (kind == ACT_LEAKY_RELU) return v < 0.0 ? a * v : v;
    if (kind == ACT_HARD_SWISH) return v * clamp(v * (1.0 / 6.0) + 0.5, 0.0, 1.0);
    if (kind == ACT_HARD_SIGMOID) return clamp(a * v + b, 0.0, 1.0);
    if (kind == ACT_SIGMOID) return 1.0 / (1.0 + exp(-v));
    if (kind == ACT_TANH) {
        // tanh() of large |v| overflows exp() inside some drivers' implementations.
        float e = exp(-2.0 * abs(v));
        return sign(v) * (1.0 - e) / (1.0 + e);
    }
    return v;
}

// Elementwise programs (vkconv.activation.Instruction): Add / Sub / Mul / Div of two operands,
// or OP_ACT + kind: an activation of the first with parameters a, b.
#define OP_ADD 0
#define OP_SUB 1
#define OP_MUL 2
#define OP_DIV 3
#define OP_ACT 16

float program_step(int op, float u, float v, float a, float b)
{
    if (op == OP_ADD) return u + v;
    if (op == OP_SUB) return u - v;
    if (op == OP_MUL) return u * v;
    if (op == OP_DIV) return u / v;
    return activate_kind(op - OP_ACT, u, a, b);
}

// A post-activation program over immediates (vkconv.Activation.post): register 0 holds the
// activated value, register 4 + k instruction k's result, an operand < 0 the immediate PFA.  Its
// constants sit at ids 200.. so that no shader's own constants collide with them; POST_N = 0
// (the default) folds it away.
layout(constant_id = 200) const int POST_N = 0;
#define POST_INSTRUCTION(K, ID) \
    layout(constant_id = ID) const int POP##K = OP_ADD; \
    layout(constant_id = ID + 1) const int PA##K = 0; \
    layout(constant_id = ID + 2) const int PB##K = 0; \
    layout(constant_id = ID + 3) const float PFA##K = 0.0; \
    layout(constant_id = ID + 4) const float PFB##K = 0.0;
POST_INSTRUCTION(0, 201)
POST_INSTRUCTION(1, 206)
POST_INSTRUCTION(2, 211)
POST_INSTRUCTION(3, 216)
POST_INSTRUCTION(4, 221)
POST_INSTRUCTION(5, 226)
POST_INSTRUCTION(6, 231)
POST_INSTRUCTION(7, 236)

#define POST_STEP(K) \
    if (K < POST_N) \
        r[4 + K] = program_step(POP##K, PA##K >= 0 ? r[max(PA##K, 0)] : PFA##K, \
                                PB##K >= 0 ? r[max(PB##K, 0)] : PFA##K, PFA##K, PFB##K);

float activate(float v, float a, float b)
{
    float r[12];
    r[0] = activate_kind(ACT, v, a, b);
    POST_STEP(0)
    POST_STEP(1)
    POST_STEP(2)
    POST_STEP(3)
    POST_STEP(4)
    POST_STEP(5)
    POST_STEP(6)
    POST_STEP(7)
    return POST_N == 0 ? r[0] : r[3 + max(POST_N, 1)];
}

vec4 activate4(vec4 v, float a, float b)
{
    return vec4(activate(v.x, a, b), activate(v.y, a, b), activate(v.z, a, b), activate(v.w, a, b));
}

#endif
