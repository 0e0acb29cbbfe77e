// Fused activation epilogue shared by every op that writes a conv result.
// ACT is a specialization constant so the driver folds the switch away; the two
// parameters arrive as push constants so one pipeline serves every alpha/beta.
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

float activate(float v, float a, float b)
{
    return activate_kind(ACT, v, a, b);
}

vec4 activate4(vec4 v, float a, float b)
{
    return vec4(activate(v.x, a, b), activate(v.y, a, b), activate(v.z, a, b), activate(v.w, a, b));
}

#endif
