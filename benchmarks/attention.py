"""bbm vs FlexAttention vs SDPA vs FlashAttention-4: forward, forward+backward, metadata build, effective TFLOP/s.
(One script of ~400 lines: each peer is one small function, all timed the same way on the same inputs.)

    python benchmarks/attention.py [--masks docs,docs4,...] [--sizes 16384,32768] [--dims 128,64]
        [--heads 16] [--kv-heads 16,4] [--layout bhnd|bnhd] [--out benchmarks/results/attention_h100.json] [--sweep fwd,bwd]
    python benchmarks/attention.py --plot benchmarks/results/attention_h100.json   # PNG from a JSON (no GPU)

TFLOP/s count allowed pairs only: forward 4 D per pair per query head, backward 2.5x the forward.
FlexAttention runs compiled, its BlockMask built once (its build timed separately, plain and with
create_block_mask compiled). SDPA: flash and cuDNN for the exactly causal mask, a dense bool mask
(efficient kernel) up to --sdpa-dense-max tokens. Document-causal masks also run PyTorch's own
variable-length attention (torch.nn.attention.varlen; FlashAttention-2 kernels in torch 2.11) on the
same documents, in its (tokens, heads, D) layout. Every path takes the same (B, H, N, D) tensors, in that
memory order or, with --layout bnhd, in (B, N, H, D) memory: the layout a model's projections give
(x.view(B, N, H, D).transpose(1, 2)). With --layout bhnd, where bbm takes cuDNN's ragged path (which copies such
inputs into (B, N, H, D) memory) it is also timed on inputs already in that memory (the bnhd columns). --sweep also
times candidate tile configs. bbm's other paths that take the mask (``fa4``, ``ragged``, ``triton``) are timed forced,
with their output's difference from ``auto``'s. Where flash_attn.cute (FlashAttention-4, ``pip install bbm[hopper]``)
imports, it adds FA4's own window and variable-length entry points (their output checked against bbm's) and
FlexAttention's FLASH backend (the same BlockMask on FA4's kernels).
"""
import argparse
import faulthandler
import inspect
import json
import signal
import time
from pathlib import Path

import torch

import bbm
from attention_masks import MASKS, WINDOWS, build, document_ids
from bbm.attention import fa4
from common import environment, results_path, timed, write_json

META_TILE = (128, 128)


def wall_ms(fn, repeat: int = 20, warmup: int = 2) -> float:
    """Median wall-clock milliseconds from launch to finished on the GPU (CPU-bound work included)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def fwd_bwd(fn, q, k, v, grad):
    return lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), grad)


def rel_diff(a, b) -> float:
    """Relative difference of two outputs, as a whole (norm of the difference over the norm of ``b``)."""
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def first_line(e: Exception, width: int = 200) -> str:
    """An error as one short line for the results file."""
    return str(e).splitlines()[0][:width] if str(e) else type(e).__name__


class TimedOut(Exception):
    pass


def _alarm(signum, frame):
    raise TimedOut()


def guarded(fn, seconds: int = 0):
    """fn() or None when it runs out of memory or (seconds > 0) takes longer than that: some inductor
    compiles of FlexAttention hung on the H100 (see docs/notes/attention.md)."""
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(seconds)
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None
    except Exception as e:  # inductor wraps the alarm's TimedOut in its own error
        if not (isinstance(e, TimedOut) or isinstance(e.__cause__, TimedOut) or "TimedOut" in repr(e)):
            raise
        print(f"    timed out after {seconds} s", flush=True)
        return None
    finally:
        signal.alarm(0)


def time_pair(fn, q, k, v, grad, repeat):
    return (guarded(lambda: timed(lambda: fn(q, k, v), q.device, repeat=repeat)),
            guarded(lambda: timed(fwd_bwd(fn, q, k, v, grad), q.device, repeat=repeat)))


def flex_case(mask_mod, q, k, v, grad, n_q, n_k, repeat, row, compile_seconds):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    dev = q.device
    make = lambda: create_block_mask(mask_mod, None, None, n_q, n_k, device=dev)
    row["flex_blockmask_ms"] = guarded(lambda: wall_ms(make, repeat=5, warmup=1), 60)
    compiled_make = torch.compile(create_block_mask)
    make_c = lambda: compiled_make(mask_mod, None, None, n_q, n_k, device=dev)
    if compile_seconds > 0:
        row["flex_blockmask_compiled_ms"] = guarded(lambda: wall_ms(make_c, repeat=10), compile_seconds)
    block_mask = guarded(make_c if row.get("flex_blockmask_compiled_ms") else make, 30)
    if block_mask is None:
        return None
    flex = torch.compile(flex_attention, dynamic=False)
    gqa = q.shape[1] != k.shape[1]
    fn = lambda q, k, v: flex(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    if guarded(lambda: fwd_bwd(fn, q, k, v, grad)(), 120) is None:  # compile forward and backward
        return None
    row["flex_fwd_ms"], row["flex_fwdbwd_ms"] = time_pair(fn, q, k, v, grad, repeat)
    if fa4.installed():  # FlexAttention's FLASH backend: the same BlockMask on FlashAttention-4's kernels
        options = {"BACKEND": "FLASH"}
        flash = lambda q, k, v: flex(q, k, v, block_mask=block_mask, enable_gqa=gqa, kernel_options=options)
        try:
            if guarded(lambda: fwd_bwd(flash, q, k, v, grad)(), 90) is not None:
                row["flex_flash_fwd_ms"], row["flex_flash_fwdbwd_ms"] = time_pair(flash, q, k, v, grad, repeat)
        except Exception as e:  # noqa: BLE001 - an unsupported case is reported, not fatal
            row["flex_flash_error"] = first_line(e)
    return fn


def fa4_native_case(name, mask, q, k, v, grad, repeat, row):
    """FlashAttention-4's own interface where it states the mask: windows and causal through ``window_size``,
    documents through its variable-length entry point (one sample), on the same (B, N, H, D) memory."""
    from flash_attn.cute import flash_attn_func, flash_attn_varlen_func
    window = WINDOWS.get(name)
    bnhd = lambda t: t.transpose(1, 2)  # free for the bnhd layout
    if name in ("causal", "window", "window4k"):
        left = None if window is None else window - 1  # FA4 reads a left side of -1 as no key before the query
        fn = lambda q, k, v: bnhd(flash_attn_func(bnhd(q), bnhd(k), bnhd(v), causal=True, window_size=(left, 0))[0])
    elif name in ("docs", "docs4", "docs_window") and q.shape[0] == 1:
        counts = torch.unique_consecutive(document_ids(name, q.shape[2], q.device), return_counts=True)[1]
        cu = torch.nn.functional.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
        longest = int(counts.max())
        left = None if window is None else window - 1
        fn = lambda q, k, v: bnhd(flash_attn_varlen_func(bnhd(q)[0], bnhd(k)[0], bnhd(v)[0], cu_seqlens_q=cu,
                                                         cu_seqlens_k=cu, max_seqlen_q=longest, max_seqlen_k=longest,
                                                         causal=True, window_size=(left, 0))[0][None])
    else:
        return
    try:
        if guarded(lambda: fwd_bwd(fn, q, k, v, grad)(), 90) is not None:
            row["fa4_fwd_ms"], row["fa4_fwdbwd_ms"] = time_pair(fn, q, k, v, grad, repeat)
            with torch.no_grad():  # the same mask, stated FA4's way: the outputs agree
                row["rel_diff_vs_fa4"] = rel_diff(bbm.attention(q, k, v, mask), fn(q, k, v))
    except Exception as e:  # noqa: BLE001 - an unsupported case is reported, not fatal
        row["fa4_error"] = first_line(e)


def sdpa_cases(mask, q, k, v, grad, repeat, dense_max, row):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    F = torch.nn.functional
    gqa = q.shape[1] != k.shape[1]
    if mask.exactly_causal:
        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            def fn(q, k, v, backend=backend):
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            try:
                row[f"sdpa_{name}_fwd_ms"], row[f"sdpa_{name}_fwdbwd_ms"] = time_pair(fn, q, k, v, grad, repeat)
            except RuntimeError as e:  # backend unavailable for these inputs
                row[f"sdpa_{name}_error"] = first_line(e)
    elif max(mask.n_q, mask.n_k) <= dense_max:
        allowed = mask.to_dense()
        fn = lambda q, k, v: bbm.attention(q, k, v, bbm.Mask.from_dense(allowed), backend="sdpa")
        row["sdpa_dense_fwd_ms"], row["sdpa_dense_fwdbwd_ms"] = time_pair(fn, q, k, v, grad, max(3, repeat // 4))


def varlen_case(name, n, mask, q, k, v, grad, repeat, row):
    """torch.nn.attention.varlen on the documents of a "docs"/"docs4" mask (same heads for Q and K/V)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return
    if name not in ("docs", "docs4") or q.shape[1] != k.shape[1]:
        return
    counts = torch.unique_consecutive(document_ids(name, n, q.device), return_counts=True)[1]
    cu = torch.nn.functional.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
    longest = int(counts.max())
    params = inspect.signature(varlen_attn).parameters
    causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    packed = lambda t: t[0].transpose(0, 1).detach().contiguous()  # (tokens, heads, D)
    qv, kv, vv = (packed(t).requires_grad_() for t in (q, k, v))
    gv = packed(grad)
    fn = lambda q, k, v: varlen_attn(q, k, v, cu, cu, longest, longest, **causal)
    try:
        row["varlen_fwd_ms"], row["varlen_fwdbwd_ms"] = time_pair(fn, qv, kv, vv, gv, repeat)
    except RuntimeError as e:  # no varlen kernel for these inputs
        row["varlen_error"] = first_line(e)
        return
    with torch.no_grad():
        row["rel_diff_vs_varlen"] = rel_diff(bbm.attention(q, k, v, mask), fn(qv, kv, vv).transpose(0, 1)[None])


def sweep(q, k, v, grad, mask, repeat, row, which):
    """Candidate tile configs of bbm's kernels ("fwd" and/or "bwd"): forward and forward+backward times,
    and the largest relative difference of the output and gradients from the default config's."""
    from bbm.attention.triton import flash_attention
    from bbm.attention.triton.tuning import candidates
    scale = q.shape[-1] ** -0.5
    run = lambda cfg: (lambda q, k, v: flash_attention(q, k, v, mask, scale, cfg))
    outputs = lambda fn: [fn(q, k, v)] + list(fwd_bwd(fn, q, k, v, grad)())
    want = outputs(run(None))
    row["sweep"] = {}
    for direction in which:
        for cfg in candidates(q.shape[-1], direction):
            key = (f"{direction} {cfg.block_m}x{cfg.block_n} w{cfg.fwd_warps} s{cfg.fwd_stages}"
                   f" | bwd {cfg.big}/{cfg.small} w{cfg.bwd_warps} s{cfg.bwd_stages}")
            try:
                got = guarded(lambda: outputs(run(cfg)), 180)
                diff = max(rel_diff(a, b) for a, b in zip(got, want))
                row["sweep"][key] = time_pair(run(cfg), q, k, v, grad, repeat) + (diff,)
            except Exception as e:  # noqa: BLE001 - a config that fails to compile is reported, not fatal
                row["sweep"][key] = first_line(e, 160)
            print(f"    sweep {key}: {row['sweep'][key]}", flush=True)


def path_runs(path, q, mask) -> bool:
    from bbm.attention import ragged
    if path == "fa4":
        return fa4.supports(q, mask)
    if path == "ragged":
        return ragged.available(q) and ragged.supports(q, mask)
    return True


def other_path_case(path, q, k, v, grad, mask, make_mask, repeat, row):
    """One of bbm's paths forced (``backend=path``): its plan's time, forward and forward+backward, and its output's
    relative difference from auto's."""
    fn = lambda q, k, v: bbm.attention(q, k, v, mask, backend=path)
    try:
        if guarded(lambda: fwd_bwd(fn, q, k, v, grad)(), 90) is None:  # compiles (FA4: a JIT per configuration)
            return
        row[f"bbm_{path}_meta_ms"] = wall_ms(lambda: bbm.plan(q, make_mask(), path), repeat=repeat)
        row[f"bbm_{path}_fwd_ms"], row[f"bbm_{path}_fwdbwd_ms"] = time_pair(fn, q, k, v, grad, repeat)
        with torch.no_grad():
            row[f"rel_diff_{path}"] = rel_diff(bbm.attention(q, k, v, mask), fn(q, k, v))
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        row[f"bbm_{path}_error"] = first_line(e)


def run_case(name, n, d, heads, kv_heads, args, dev):
    make_mask, mask_mod, n_q, n_k = build(name, n, dev)
    g = torch.Generator(device=dev).manual_seed(n + d)
    def rnd(h, length):  # (B, H, N, D), in that memory order or (--layout bnhd) in a model's (B, N, H, D) order
        shape = (1, h, length, d) if args.layout == "bhnd" else (1, length, h, d)
        t = torch.randn(shape, device=dev, generator=g, dtype=torch.bfloat16)
        return (t if args.layout == "bhnd" else t.transpose(1, 2)).requires_grad_()
    q, k, v = rnd(heads, n_q), rnd(kv_heads, n_k), rnd(kv_heads, n_k)
    grad = rnd(heads, n_q).detach()
    stage(f"{name} N={n} D={d} {heads}:{kv_heads}")
    row = {"mask": name, "n": n, "n_q": n_q, "n_k": n_k, "d": d, "heads": heads, "kv_heads": kv_heads,
           "layout": args.layout}
    row["mask_build_ms"] = wall_ms(make_mask, repeat=args.repeat)  # the Mask alone (ranges or dense)
    row["bbm_meta_ms"] = wall_ms(lambda: bbm.plan(q, make_mask()), repeat=args.repeat)  # + tile lists
    mask = make_mask()
    pairs = mask.allowed_pairs() * heads
    row.update(density=mask.density, fwd_tflop=4 * d * pairs / 1e12, tiles=mask.tile_summary(*META_TILE))
    row["bbm_backend"] = bbm.choose_backend(q, mask)
    fn = lambda q, k, v: bbm.attention(q, k, v, mask)
    row["bbm_fwd_ms"], row["bbm_fwdbwd_ms"] = time_pair(fn, q, k, v, grad, args.repeat)
    for path in ("fa4", "ragged", "triton"):  # bbm's other paths that take this mask, each with its metadata
        if path != row["bbm_backend"] and path_runs(path, q, mask):
            other_path_case(path, q, k, v, grad, mask, make_mask, args.repeat, row)
    if row["bbm_backend"] == "ragged" and args.layout == "bhnd":  # and inputs in a model's memory order: no copies
        qp, kp, vp = (t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in (q, k, v))
        gp = grad.transpose(1, 2).contiguous().transpose(1, 2)
        row["bbm_bnhd_fwd_ms"], row["bbm_bnhd_fwdbwd_ms"] = time_pair(fn, qp, kp, vp, gp, args.repeat)
    stage("bbm timed")
    if not args.no_flex:
        flex = flex_case(mask_mod, q, k, v, grad, n_q, n_k, args.repeat, row, args.blockmask_compile_seconds)
        if flex is not None:  # the two outputs agree (a correctness check at full size)
            with torch.no_grad():
                row["rel_diff_vs_flex"] = rel_diff(bbm.attention(q, k, v, mask), flex(q, k, v))
        stage("flex timed")
    if fa4.installed():
        fa4_native_case(name, mask, q, k, v, grad, args.repeat, row)
    sdpa_cases(mask, q, k, v, grad, args.repeat, args.sdpa_dense_max, row)
    varlen_case(name, n, mask, q, k, v, grad, args.repeat, row)
    stage("sdpa and varlen timed")
    if args.sweep:
        sweep(q, k, v, grad, mask, args.repeat, row, args.sweep.split(","))
    add_rates(row)
    return row


def stage(what):
    """Progress line; a stage that hangs gets its stack dumped (faulthandler) before the run's time-out."""
    print(f"    {time.strftime('%H:%M:%S')} {what}", flush=True)
    faulthandler.dump_traceback_later(240, exit=False)


def add_rates(row):
    """Effective TFLOP/s and bbm's time over each peer's."""
    for key in [k for k in row if k.endswith("_ms") and ("fwd" in k)]:
        if row[key]:
            flop = row["fwd_tflop"] * (3.5 if key.endswith("fwdbwd_ms") else 1.0)
            row[key[:-3] + "_tflops"] = flop / (row[key] / 1e3)
    for peer in ("flex", "flex_flash", "fa4", "sdpa_flash", "sdpa_cudnn", "sdpa_dense", "varlen"):
        for what in ("fwd", "fwdbwd"):
            for path in ("", "triton_", "fa4_", "ragged_", "bnhd_"):
                mine, theirs = row.get(f"bbm_{path}{what}_ms"), row.get(f"{peer}_{what}_ms")
                if mine and theirs:
                    row[f"ratio_{path}{what}_vs_{peer}"] = mine / theirs


def fmt(x, spec="8.2f"):
    width = int(spec.split(".")[0]) if spec[0].isdigit() else 8
    return f"{x:{spec}}" if isinstance(x, (int, float)) else f"{'-':>{width}}"


def print_table(rows):
    """fwd+bwd ms of each path and peer, bbm's TFLOP/s (allowed pairs), bbm / Flex."""
    cols = [("bbm", "bbm_fwdbwd_ms"), ("triton", "bbm_triton_fwdbwd_ms"), ("bbm fa4", "bbm_fa4_fwdbwd_ms"),
            ("cuDNN", "bbm_ragged_fwdbwd_ms"),
            ("flex", "flex_fwdbwd_ms"), ("flexFLASH", "flex_flash_fwdbwd_ms"), ("FA4", "fa4_fwdbwd_ms"),
            ("varlen", "varlen_fwdbwd_ms")]
    print(f"{'mask':>11} {'N':>6} {'D':>3} {'H':>5} {'dens':>5} | " + " ".join(f"{c:>9}" for c, _ in cols)
          + f" | {'TF/s':>5} {'bbm/flex':>8} | backend")
    for r in rows:
        sdpa = r.get("sdpa_cudnn_fwdbwd_ms") or r.get("sdpa_flash_fwdbwd_ms")
        print(f"{r['mask']:>11} {r['n']:>6} {r['d']:>3} {r['heads']:>2}:{r['kv_heads']:<2} {r['density']:5.3f} | "
              + " ".join(f"{fmt(r.get(key), '9.2f')}" for _, key in cols)
              + f" | {fmt(r.get('bbm_fwdbwd_tflops'), '5.0f')} {fmt(r.get('ratio_fwdbwd_vs_flex'), '8.2f')} | "
              f"{r['bbm_backend']}" + (f" (sdpa {sdpa:.2f})" if sdpa else ""), flush=True)


def plot(json_path, png_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    data = json.loads(Path(json_path).read_text())
    rows = data["rows"]
    panels = sorted({(r["mask"], r["d"], r["heads"], r["kv_heads"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (mask, d, h, hk) in zip(axes[0], panels):
        sel = sorted((r for r in rows if (r["mask"], r["d"], r["heads"], r["kv_heads"]) == (mask, d, h, hk)),
                     key=lambda r: r["n"])
        for key, label in (("bbm_fwdbwd_tflops", "bbm"), ("bbm_triton_fwdbwd_tflops", "bbm Triton"),
                           ("bbm_bnhd_fwdbwd_tflops", "bbm, (B, N, H, D) memory"),
                           ("bbm_fa4_fwdbwd_tflops", "bbm on FA4"), ("bbm_ragged_fwdbwd_tflops", "bbm on cuDNN"),
                           ("flex_fwdbwd_tflops", "FlexAttention"),
                           ("flex_flash_fwdbwd_tflops", "Flex FLASH"), ("fa4_fwdbwd_tflops", "FlashAttention-4"), ("sdpa_cudnn_fwdbwd_tflops", "SDPA cuDNN"),
                           ("sdpa_flash_fwdbwd_tflops", "SDPA flash"), ("sdpa_dense_fwdbwd_tflops", "SDPA dense mask"),
                           ("varlen_fwdbwd_tflops", "PyTorch varlen")):
            pts = [(r["n"], r[key]) for r in sel if r.get(key)]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{mask} D={d} H={h}:{hk}", fontsize=9)
        ax.set_xlabel("tokens")
        ax.set_ylabel("fwd+bwd TFLOP/s (allowed pairs)")
        ax.legend(fontsize=7)
    env = data["env"]
    fig.suptitle(f"{env['card']}, torch {env['torch']}, triton {env['triton']}, {env['date']}", fontsize=9)
    fig.tight_layout()
    tmp = Path(png_path).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(png_path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--masks", default="docs,docs4,causal")
    ap.add_argument("--sizes", default="16384,32768,65536,131072")
    ap.add_argument("--dims", default="128")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", default="16", help="comma list; 4 with 16 heads is GQA 4:1")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--layout", choices=("bhnd", "bnhd"), default="bhnd",
                    help="memory order of q, k, v for every path: (B, H, N, D), or (B, N, H, D) as from a model")
    ap.add_argument("--sdpa-dense-max", type=int, default=32768)
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--blockmask-compile-seconds", type=int, default=90,
                    help="time limit of the compiled create_block_mask timing (0: skip it)")
    ap.add_argument("--sweep", default="", help="also time every candidate config of: fwd,bwd")
    ap.add_argument("--out", help="results JSON (default benchmarks/results/attention_<card>.json)")
    ap.add_argument("--plot", metavar="JSON", help="only draw the PNG of an existing JSON")
    args = ap.parse_args()
    if args.plot:
        plot(args.plot, Path(args.plot).with_suffix(".png"))
        return
    torch._dynamo.config.cache_size_limit = 256
    dev = torch.device("cuda")
    out = args.out or results_path("attention", dev)
    rows = []
    for name in args.masks.split(","):
        if name not in MASKS:
            raise ValueError(f"--masks: expected names from {MASKS}, got {name!r}")
        for d in (int(x) for x in args.dims.split(",")):
            for kv in (int(x) for x in args.kv_heads.split(",")):
                for n in (int(x) for x in args.sizes.split(",")):
                    t0 = time.time()
                    rows.append(run_case(name, n, d, args.heads, kv, args, dev))
                    print(f"  [{name} N={n} D={d} {args.heads}:{kv} done in {time.time() - t0:.0f} s] "
                          + json.dumps({k: v for k, v in rows[-1].items() if k != "sweep"}), flush=True)
                    write_json(out, {"env": environment(dev), "rows": rows})
    print_table(rows)
    print(f"wrote {out}; draw its PNG with --plot {out}")


if __name__ == "__main__":
    main()
