"""Time of sparse MLA training (docs/SPEC.md §8, §9.2) at DeepSeek-V3.2's shape, forward + backward, beside what a
PyTorch user would run instead.

    PYTHONPATH=build-gpu/python python3 bench/gpu/mla_backward_time.py [--tokens 8192 32768] [--heads 64 128]
        [--k 2048 256] [--json results.jsonl] [--budget-s 80]
    PYTHONPATH=build-cpu/python python3 bench/gpu/mla_backward_time.py --device cpu --tokens 64 --k 16 --heads 8

One causal prefill of T tokens over its own latent cache (N = T): q [T, H, 576] (512 latent + 64 RoPE channels),
kv [N, 576] (one latent head; the value of a slot is its first 512 channels, Dv = 512), bf16, scale 1/sqrt(192)
(the non-absorbed model's qk head dim). Each row t selects min(k, t + 1) distinct random keys in [0, t] (-1 in
its other entries), drawn once outside the timings by bench/gpu/attention_backward_gpu.py's random_causal_selection
(random keys are the worst case for the cache hit rate). Timed (CUDA events on a GPU, perf_counter on the CPU), median of the
timed calls after warm-ups: two warm-ups and up to --repeat timed calls, fewer where one call is long (one warm-up
when it took over 0.25 s; the timed calls cut to what fits in --measure-s, at least one). Per shape (T, H, k):
  keysel fwd          keysel.sparse_mla, keysel's forward kernel (bf16 out, lse)
  keysel bwd          keysel.sparse_mla_backward alone (keysel's deterministic backward; float32 grad_q, grad_kv)
  kernels fwd+bwd     the sum of the two medians above: what the training step costs with keysel's kernels
  autograd fwd+bwd    keysel.torch.sparse_mla forward + torch.autograd.grad of out (q, kv); on CUDA its forward is
                      the gather-based PyTorch version (docs/training.md), its backward keysel's kernel; run only
                      where the gathered float32 latents [T, k, 576] fit (a printed reason otherwise)
  masked fwd+bwd      the same math in plain PyTorch autograd: dense scores [H, T, N], the selection as a -inf mask,
                      float32 softmax; only where [H, T, N] float32 fits comfortably (a printed reason otherwise)
  flash fwd+bwd       torch scaled_dot_product_attention on the FLASH_ATTENTION backend, is_causal, forward +
                      backward, on the same model's non-absorbed MHA form (H heads, qk dim 192 = 128 + 64 RoPE, v
                      dim 128, padded to 192 where the flash backend needs equal dims; the header says which): what
                      a user training DSA densely runs. It depends on (T, H) only. Not on the CPU.

Useful flops (what TFLOP/s counts). With E = H * sum_t (valid slots of row t) the (row, head, slot) terms:
    backward  = 2 E (3 * 576 + 2 * 512) = 5504 E   (recompute S = q.x over 576, dP = dO.x[:512], dq += dS x over 576,
                                                    dkv += dS q over 576, dkv[:512] += P dO)
    forward   = 2 E (576 + 512)         = 2176 E   (S over 576, out += P x[:512])
keysel's backward kernel computes S and dP twice (its query and key passes); the second time is not counted. The
flash column counts the causal pairs C = T (T + 1) / 2 with the real v dim (128): forward 2 H C (192 + 128), backward
2 H C (3 * 192 + 2 * 128).

--budget-s bounds the run: a measurement whose predicted time (from the rate the same measurement reached on an
earlier, smaller shape; shapes run smallest first) exceeds what is left is skipped, saying so and naming the command
that runs it alone. --json FILE appends one JSON line per shape.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

import keysel
import keysel.torch as kt
from attention_backward_gpu import random_causal_selection, selection_mask  # same folder

D_QK, D_V = 576, 512
FLASH_QK, FLASH_V = 192, 128          # the non-absorbed MHA form: 128 nope + 64 RoPE channels, v 128
BWD_FLOPS, FWD_FLOPS = 2 * (3 * D_QK + 2 * D_V), 2 * (D_QK + D_V)
AGREE = 3e-2  # ||grad - kernel's grad|| / ||kernel's grad|| above this (or NaN) is flagged


def masked_mla(q, kv, mask, scale):
    """out [T, H, 512] from dense scores [H, T, N] (float32 softmax), -inf outside mask [T, N]."""
    scores = torch.einsum("thd,nd->htn", q, kv).float() * scale
    p = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.einsum("htn,nd->thd", p.to(q.dtype), kv[:, :D_V])


def free_bytes(device):
    """Memory a new tensor can take: the GPU's free memory plus the allocator's cached blocks; the CPU's available
    pages."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(
            device)
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def rel_diff(got, want, rows=1024):
    """||got - want|| / ||want||, summed in float64 over blocks of `rows` leading rows (no float64 copy of the whole
    gradient: at T = 32K, H = 128 grad_q alone has 2.4G elements)."""
    num = den = 0.0
    for r0 in range(0, want.shape[0], rows):
        w = want[r0:r0 + rows].double()
        num += float((got[r0:r0 + rows].double() - w).square().sum())
        den += float(w.square().sum())
    return math.sqrt(num) / max(math.sqrt(den), 1e-300)


class Timer:
    """Median milliseconds of fn after warm-ups, within a time budget; rates per measurement name for predictions."""

    def __init__(self, device, repeat, measure_s, budget_s):
        self.device, self.repeat, self.measure_s = device, repeat, measure_s
        self.deadline = None if budget_s <= 0 else time.perf_counter() + budget_s
        self.rate = {}  # name -> work units per ms, from the last shape that ran it

    def _call_ms(self, fn):
        if self.device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn()
            stop.record()
            stop.synchronize()
            return start.elapsed_time(stop), result
        start = time.perf_counter()
        result = fn()
        return (time.perf_counter() - start) * 1e3, result

    def skip_reason(self, name, work):
        """None, or why `name` on `work` units does not fit the rest of --budget-s (a warm-up and one timed call)."""
        if self.deadline is None or name not in self.rate:
            return None
        predicted_s = 2.0 * work / self.rate[name] / 1e3
        left = self.deadline - time.perf_counter()
        if predicted_s > left:
            return (f"predicted {predicted_s:.1f} s (a warm-up and one timed call) > {max(0.0, left):.1f} s left of "
                    f"--budget-s")
        return None

    def __call__(self, name, work, fn):
        """(median ms, timed calls, the last call's result)."""
        first, result = self._call_ms(fn)
        if first < 250.0:
            _, result = self._call_ms(fn)
        calls = max(1, min(self.repeat, int(self.measure_s * 1e3 / max(first, 1e-3))))
        times = []
        for _ in range(calls):
            ms, result = self._call_ms(fn)
            times.append(ms)
        median = statistics.median(times)
        self.rate[name] = work / max(median, 1e-6)
        return median, calls, result


def flash_probe(device):
    """Whether the FLASH_ATTENTION backend takes v dim 128 beside qk dim 192, forward and backward (else v is padded
    to 192)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q = torch.zeros((1, 1, 128, FLASH_QK), device=device, dtype=torch.bfloat16, requires_grad=True)
    v = torch.zeros((1, 1, 128, FLASH_V), device=device, dtype=torch.bfloat16, requires_grad=True)
    try:
        with warnings.catch_warnings(), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            warnings.simplefilter("ignore")  # torch warns why each backend refuses before it raises
            F.scaled_dot_product_attention(q, q, v, is_causal=True).sum().backward()
        return True
    except RuntimeError:
        return False


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--heads", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--k", type=int, nargs="+", default=[2048, 256])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeat", type=int, default=5, help="timed calls at most (after warm-ups)")
    parser.add_argument("--measure-s", type=float, default=1.0,
                        help="timed calls are cut to about this many seconds per measurement (at least one)")
    parser.add_argument("--budget-s", type=float, default=80.0,
                        help="skip measurements predicted to overrun this many seconds in all (0: no limit)")
    parser.add_argument("--memory-fraction", type=float, default=0.85,
                        help="the autograd and masked baselines run where their estimated peak is within this "
                             "fraction of the free memory")
    parser.add_argument("--json", default=None, help="append one JSON line per shape to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    scale = 1.0 / math.sqrt(FLASH_QK)
    timer = Timer(device, args.repeat, args.measure_s, args.budget_s)
    flash_v = (FLASH_V if flash_probe(device) else FLASH_QK) if cuda else None
    flash_note = ("not run on the CPU (the FLASH_ATTENTION backend is CUDA only)" if not cuda else
                  "v dim 128" if flash_v == FLASH_V else
                  "v padded 128 -> 192 (the FLASH_ATTENTION backend needs equal head dims; the flops count 128)")
    print(f"# {name}; torch {torch.__version__}; keysel {keysel.__version__}; D={D_QK} Dv={D_V}, one latent head, bf16,"
          f" causal prefill N=T, scale 1/sqrt({FLASH_QK}); keysel forward kernel "
          f"{os.environ.get('KEYSEL_MLA_KERNEL', 'default')}")
    print(f"# flash: non-absorbed MHA form, qk {FLASH_QK}, {flash_note}")
    header = (f"{'T':>6} {'H':>4} {'k':>5} | {'fwd ms':>8} {'bwd ms':>9} {'bwd TF/s':>8} {'kern f+b':>9} "
              f"{'autograd':>9} | {'masked':>9} {'flash':>8} | {'flash/kern':>10} {'flash/autog':>11}")
    print(f"# ms: median; kern f+b = keysel fwd + keysel bwd; autograd = keysel.torch.sparse_mla fwd+bwd; "
          f"masked, flash: fwd+bwd; flash/x: speedup of x over flash")
    print(header, flush=True)
    generator = torch.Generator(device=device).manual_seed(1)
    rows = []
    shapes = sorted(((t, h, k) for t in args.tokens for h in args.heads for k in args.k),
                    key=lambda s: (s[0] * s[1] * s[2], s))
    flash_cache, index_cache = {}, {}
    for t, h, k in shapes:
        notes = []
        row = {"tokens": t, "heads": h, "k": k, "device": name, "dtype": "bfloat16", "scale": scale}
        if (t, k) not in index_cache:  # one draw per (T, k), shared by the head counts
            index_cache[(t, k)] = random_causal_selection(t, 1, k, generator)[:, 0]
        indices = index_cache[(t, k)]
        valid_slots = int((indices >= 0).sum())
        entries = h * valid_slots
        row["valid_slots"] = valid_slots
        q = (torch.randn((t, h, D_QK), device=device, generator=generator) * 0.5).to(torch.bfloat16)
        kv = (torch.randn((t, D_QK), device=device, generator=generator) * 0.5).to(torch.bfloat16)
        grad_out = torch.randn((t, h, D_V), device=device, generator=generator).to(torch.bfloat16)

        # keysel's kernels: forward, then the backward alone on its out and lse
        out = torch.empty((t, h, D_V), device=device, dtype=torch.bfloat16 if cuda else torch.float32)
        lse = torch.empty((t, h), device=device, dtype=torch.float32)
        top = torch.empty((t, h), device=device, dtype=torch.float32)

        def forward():
            keysel.sparse_mla(q, kv, indices, scale=scale, out=out, lse=lse, max_logits=top)

        grad_q = torch.empty((t, h, D_QK), device=device, dtype=torch.float32)
        grad_kv = torch.empty((t, D_QK), device=device, dtype=torch.float32)

        def backward():
            keysel.sparse_mla_backward(q, kv, indices, out, lse, grad_out, scale=scale, grad_q=grad_q,
                                       grad_kv=grad_kv)

        for key, work, fn, label in (("keysel_fwd", entries, forward, "keysel fwd"),
                                     ("keysel_bwd", entries, backward, "keysel bwd")):
            reason = timer.skip_reason(key, work)
            if reason:
                notes.append(f"{label}: not run, {reason}")
                row[key + "_ms"] = None
                continue
            row[key + "_ms"], row[key + "_calls"], _ = timer(key, work, fn)
        if row["keysel_bwd_ms"] is not None:
            row["keysel_bwd_tflops"] = BWD_FLOPS * entries / row["keysel_bwd_ms"] / 1e9
        if row["keysel_fwd_ms"] is not None:
            row["keysel_fwd_tflops"] = FWD_FLOPS * entries / row["keysel_fwd_ms"] / 1e9
        if row["keysel_fwd_ms"] is not None and row["keysel_bwd_ms"] is not None:
            row["kernels_fwd_bwd_ms"] = row["keysel_fwd_ms"] + row["keysel_bwd_ms"]
        have_kernel_grads = row["keysel_bwd_ms"] is not None
        if not have_kernel_grads:
            grad_q = grad_kv = None

        def baseline(key, label, work, need, too_big, prepare):
            """row[key + "_fwd_bwd_ms"]: the median time of prepare()'s function (fwd + bwd from fresh q, kv leaves,
            returning their gradients), and how far its gradients are from the kernel's; unless it would overrun
            --budget-s, or its `need` bytes do not fit the free memory (too_big() says by how much)."""
            row[key + "_fwd_bwd_ms"] = None
            reason = timer.skip_reason(key, work)
            if need > args.memory_fraction * free_bytes(device):
                reason = too_big()
            if reason:
                notes.append(f"{label} fwd+bwd: not run, {reason}")
                return
            both = prepare()
            leaves = [q.detach().clone().requires_grad_(True), kv.detach().clone().requires_grad_(True)]
            try:
                row[key + "_fwd_bwd_ms"], row[key + "_calls"], grads = timer(key, work, lambda: both(leaves))
                if have_kernel_grads:
                    row[key + "_vs_kernel_dq"] = rel_diff(grads[0], grad_q)
                    row[key + "_vs_kernel_dkv"] = rel_diff(grads[1], grad_kv)
                del grads
            except torch.OutOfMemoryError:
                notes.append(f"{label} fwd+bwd: out of memory")
            del leaves, both
            if cuda:
                torch.cuda.empty_cache()

        # keysel.torch.sparse_mla under autograd (on CUDA: gather-based forward, keysel's backward kernel)
        gathered = t * k * D_QK * 4
        need = max(3 * gathered, gathered + 5 * t * h * k * 4) + 2 * t * h * D_QK * 4 if cuda else 0

        def autograd_both(leaves):
            o, _ = kt.sparse_mla(leaves[0], leaves[1], indices, scale=scale)
            return torch.autograd.grad(o, leaves, grad_out)

        baseline("autograd", "autograd", entries, need,
                 lambda: (f"its gather-based CUDA forward needs about {need / 2**30:.0f} GiB (float32 latents "
                          f"[T, k, 576] {gathered / 2**30:.1f} GiB, three at once), "
                          f"{free_bytes(device) / 2**30:.0f} GiB free"),
                 lambda: autograd_both)

        # the masked dense baseline
        masked_need = 5 * h * t * t * 4

        def masked_prepare():
            mask = selection_mask(indices, t).contiguous()
            return lambda leaves: torch.autograd.grad(masked_mla(leaves[0], leaves[1], mask, scale), leaves, grad_out)

        baseline("masked", "masked", h * t * t, masked_need,
                 lambda: (f"[H, T, N] float32 is {h * t * t * 4 / 2**30:.0f} GiB, about five of them at once "
                          f"({masked_need / 2**30:.0f} GiB; {free_bytes(device) / 2**30:.0f} GiB free)"),
                 masked_prepare)
        del q, kv, grad_out, out, lse, top, grad_q, grad_kv

        # dense flash on the non-absorbed form (once per (T, H))
        if not cuda:
            row["flash_fwd_bwd_ms"] = None
            notes.append("flash fwd+bwd: not run, " + flash_note)
        elif (t, h) not in flash_cache:
            reason = timer.skip_reason("flash", h * t * t)
            if reason:
                flash_cache[(t, h)] = (None, reason)
            else:
                qf, kf = (torch.randn((1, h, t, FLASH_QK), device=device, generator=generator).to(torch.bfloat16)
                          .requires_grad_(True) for _ in range(2))
                vf = torch.randn((1, h, t, flash_v), device=device, generator=generator).to(torch.bfloat16)
                vf.requires_grad_(True)
                gf = torch.randn((1, h, t, flash_v), device=device, generator=generator).to(torch.bfloat16)

                def flash():
                    from torch.nn.attention import SDPBackend, sdpa_kernel
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        o = F.scaled_dot_product_attention(qf, kf, vf, is_causal=True, scale=scale)
                    return torch.autograd.grad(o, (qf, kf, vf), gf)

                try:
                    ms, calls, _ = timer("flash", h * t * t, flash)
                    flash_cache[(t, h)] = (ms, calls)
                except torch.OutOfMemoryError:
                    flash_cache[(t, h)] = (None, "out of memory")
                del qf, kf, vf, gf
                torch.cuda.empty_cache()
        if cuda:
            ms, extra = flash_cache[(t, h)]
            row["flash_fwd_bwd_ms"] = ms
            if ms is None:
                notes.append(f"flash fwd+bwd: not run, {extra}")
            else:
                row["flash_calls"] = extra
                pairs = t * (t + 1) / 2
                row["flash_tflops"] = 2 * h * pairs * (4 * FLASH_QK + 3 * FLASH_V) / ms / 1e9
                row["flash_v_dim"] = flash_v
        if row["flash_fwd_bwd_ms"] is not None and row.get("kernels_fwd_bwd_ms"):
            row["speedup_kernels_vs_flash"] = row["flash_fwd_bwd_ms"] / row["kernels_fwd_bwd_ms"]
        if row["flash_fwd_bwd_ms"] is not None and row["autograd_fwd_bwd_ms"] is not None:
            row["speedup_autograd_vs_flash"] = row["flash_fwd_bwd_ms"] / row["autograd_fwd_bwd_ms"]

        def cell(value, width, form="{:.2f}"):
            return f"{'-' if value is None else form.format(value):>{width}}"

        for note in notes:
            print(f"#   T={t} H={h} k={k}: {note}")
        if any("--budget-s" in note for note in notes):
            print(f"#   (alone: {sys.executable} {sys.argv[0]} --device {args.device} --tokens {t} --heads {h} --k {k}"
                  f" --budget-s 0)")
        checks = [f"{a} {row[a]:.1e}" for a in ("autograd_vs_kernel_dq", "autograd_vs_kernel_dkv",
                                                "masked_vs_kernel_dq", "masked_vs_kernel_dkv") if a in row]
        if checks:
            agree = all(row[a] <= AGREE for a in row if a.endswith(("_vs_kernel_dq", "_vs_kernel_dkv")))  # NaN: no
            verdict = "" if agree else f"  DISAGREE (over {AGREE:g}: bf16 rounding gives about 1e-2 at most)"
            print(f"#   T={t} H={h} k={k}: relative difference of the gradients, " + ", ".join(checks) + verdict)
        print(f"{t:>6} {h:>4} {k:>5} | {cell(row['keysel_fwd_ms'], 8)} {cell(row['keysel_bwd_ms'], 9)} "
              f"{cell(row.get('keysel_bwd_tflops'), 8, '{:.1f}')} {cell(row.get('kernels_fwd_bwd_ms'), 9)} "
              f"{cell(row['autograd_fwd_bwd_ms'], 9)} | {cell(row['masked_fwd_bwd_ms'], 9)} "
              f"{cell(row['flash_fwd_bwd_ms'], 8)} | {cell(row.get('speedup_kernels_vs_flash'), 10, '{:.2f}x')} "
              f"{cell(row.get('speedup_autograd_vs_flash'), 11, '{:.2f}x')}", flush=True)
        row["notes"] = notes
        rows.append(row)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
