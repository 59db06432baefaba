"""The profiler's tables from a trace's events: kernel kinds, GPU busy time, per-phase idle time."""


def test_profile_kernel_breakdown():
    from bbm.train.profiling import OTHER, kernel_breakdown, kernel_kind
    kinds = {"bwd_kernel": "attention", "fwd_kernel": "attention",
             "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x64x128_4x1x1_kernel0_0": "attention",
             "triton_tem_fused_0": "attention", "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT": "matmul",
             "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64": "matmul",
             "void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>": "optimizer",
             "ncclDevKernel_AllReduce_Sum_f32_RING_LL": "communication", "Memcpy DtoD (Device -> Device)": "copies",
             "triton_poi_fused_mul_silu_0": OTHER, "void at::native::vectorized_elementwise_kernel<8>": OTHER}
    assert {name: kernel_kind(name) for name in kinds} == kinds
    text = kernel_breakdown([("bwd_kernel", 3000.0), ("fwd_kernel", 1000.0), ("nvjet_x", 4000.0),
                             ("triton_poi_fused_mul_silu_0", 2000.0)], steps=2)
    assert text.splitlines() == ["GPU kernel time per step: 5.0 ms",
                                 "  attention                      2.0 ms   40.0%",
                                 "  matmul                         2.0 ms   40.0%",
                                 f"  {OTHER:<24}       1.0 ms   20.0%"]


def test_gpu_busy_time_counts_overlapping_kernels_once():
    from bbm.train.profiling import busy_line, gpu_busy_us
    events = [{"cat": "kernel", "ts": 0.0, "dur": 10.0}, {"cat": "kernel", "ts": 5.0, "dur": 10.0},  # overlap: 0-15
              {"cat": "kernel", "ts": 6.0, "dur": 2.0},  # inside
              {"cat": "gpu_memcpy", "ts": 20.0, "dur": 5.0}, {"cat": "cpu_op", "ts": 0.0, "dur": 100.0},
              {"cat": "gpu_memset", "ts": 25.0, "dur": 1.0}, {"cat": "ac2g", "ts": 30.0}]  # touching: 20-26
    assert gpu_busy_us(events) == 21.0 and gpu_busy_us([]) == 0.0
    assert busy_line(21000.0, 42000.0, 2) == ("GPU busy 10.5 ms of 21.0 ms wall per step (50.0%; the rest it waited "
                                              "for the host)")


def test_phase_lines_count_the_gpu_idle_time_of_each_phase():
    from bbm.train.profiling import phase_lines
    events = [{"cat": "user_annotation", "name": "bbm.forward", "ts": 0.0, "dur": 10000.0},
              {"cat": "user_annotation", "name": "bbm.optimizer", "ts": 10000.0, "dur": 4000.0},
              {"cat": "user_annotation", "name": "ProfilerStep", "ts": 0.0, "dur": 14000.0},  # not a phase
              {"cat": "kernel", "ts": 1000.0, "dur": 6000.0}, {"cat": "kernel", "ts": 2000.0, "dur": 1000.0},
              {"cat": "kernel", "ts": 9000.0, "dur": 2000.0}]  # 1 ms in each phase
    assert phase_lines(events, steps=1).splitlines() == [
        "  forward                  host    10.0 ms, GPU idle    3.0 ms",
        "  optimizer                host     4.0 ms, GPU idle    3.0 ms"]


def test_gpu_summary_counts_each_kernel_once():
    """Kernel kinds come from the trace's GPU events, not from the operator table's compiled-graph entries."""
    from bbm.train.profiling import gpu_summary
    events = [{"cat": "kernel", "name": "triton_poi_fused_mul_silu_0", "ts": 0.0, "dur": 2000.0},
              {"cat": "kernel", "name": "nvjet_sm90_tst_256x128", "ts": 2000.0, "dur": 6000.0},
              {"cat": "cpu_op", "name": "## Call CompiledFxGraph abc", "ts": 0.0, "dur": 2500.0},
              {"cat": "gpu_memset", "name": "Memset (Device)", "ts": 8000.0, "dur": 2000.0},
              {"cat": "user_annotation", "name": "bbm.forward", "ts": 0.0, "dur": 12000.0}]
    assert gpu_summary(events, wall_us=12000.0, steps=1).splitlines() == [
        "GPU kernel time per step: 10.0 ms",
        "  matmul                         6.0 ms   60.0%",
        f"  {'element-wise and other':<24}       2.0 ms   20.0%",
        "  copies                         2.0 ms   20.0%",
        "GPU busy 10.0 ms of 12.0 ms wall per step (83.3%; the rest it waited for the host)",
        "per step phase (host wall time, and the GPU's idle time meanwhile):",
        "  forward                  host    12.0 ms, GPU idle    2.0 ms"]
