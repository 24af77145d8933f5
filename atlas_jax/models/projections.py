"""The seven projections of a decoder layer, as one table of einsums.

Each entry is one layer's call, input and weight -> output, in the shape letters of
models/decoder.py. The weight's letters the input shares are its input (contracted) axes;
the rest are its output axes. Everything that needs that split reads it from here: the
layer's matmuls and LoRA's A [*in, R] and B [R, *out] (models/lora.py), NF4's groups along
the last input axis (models/quant.py), and HF's [out, in] checkpoint layout (models/hf.py).
The stacked weights carry a leading layer axis in front of these.
"""

from __future__ import annotations

EINSUMS = {
    "q_proj": "BTD,DNH->BTNH",
    "k_proj": "BTD,DKH->BTKH",
    "v_proj": "BTD,DKH->BTKH",
    "o_proj": "BTNH,NHD->BTD",
    "gate_proj": "BTD,DF->BTF",
    "up_proj": "BTD,DF->BTF",
    "down_proj": "BTF,FD->BTD",
}


def _input_axes(einsum: str) -> int:
    x_spec, w_spec = einsum.split("->")[0].split(",")
    return sum(letter in x_spec for letter in w_spec)


# projection -> how many of its weight's axes (after the layer axis) are inputs: o_proj has
# two (heads, head_dim), every other one has one
INPUT_AXES = {name: _input_axes(einsum) for name, einsum in EINSUMS.items()}
