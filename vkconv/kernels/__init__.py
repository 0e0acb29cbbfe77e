"""What the shaders share with their host code, independent of any one op: activation epilogues
(the instruction set of the fused post-ops), integer-division magic numbers, ONNX shape rules and
the device-derived tiling choices."""
