"""fastlego's Triton kernels, installed as `fastlego.kernels`.

One op family per module. Each module exposes, per op, a launcher named after the op with the
signature of its twin in `fastlego.reference` (`fastlego.fp8` for the FP8 ops) (plus a
keyword-only `out=`), and
`<op>_not_supported_reasons`, which the dispatcher (`fastlego.ops` registers them) asks before
every call. Importing a kernel module needs triton; `policy` does not.

  brick_embed.py            brick_embed, brick_embed_input_grad (its backward to the images)
  modulated_linear.py       modulated_linear: LN + adaLN modulate + Linear [+ GELU], fused GEMM or
                            LN-modulate pass + cuBLAS
  linear_gated_residual.py  linear_gated_residual: Linear + gate + residual, fused GEMM or cuBLAS
  layernorm_modulate.py     layernorm_modulate, layernorm_modulate_backward; LayerNorm statistics
  gated_residual.py         gated_residual_backward
  gelu.py                   gelu_tanh_backward; the tanh-GELU @triton.jit helpers
  window_attention.py       window_attention, global_attention (Triton backend),
                            window_attention_backward
  final_layer.py            final_layer: LN + modulate + Linear + unpatchify + fold
  fp8_quantize.py           FP8 inference's activation quantizers, each fused into the row pass
                            that reads the rows: layernorm_modulate_quantize, gelu_quantize,
                            quantize_rows (twins in `fastlego.fp8`)
  fp8_linear.py             fp8_linear: the FP8 GEMM with row / channel scales (the alternative
                            to torch._scaled_mm; `fastlego.tune` picks per shape)
  cublaslt.py               cuBLASLt's GEMM epilogues through ctypes (GELU_AUX_BIAS, DGELU_BGRAD,
                            BGRADB) for the MLP, a route under measurement (not dispatched yet)
  gemm.py                   the GEMM tile machinery of the two matmul ops (configs, autotuning,
                            tuning keys and candidates)
  rows.py                   the tiling of the row-wise kernels
  policy.py                 one rule each for dtypes and autocast, fp32 dot precision (TF32),
                            LayerNorm eps, `out=` buffers, and the support checks
"""
