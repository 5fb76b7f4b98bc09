"""End-to-end MAE pretraining step: mae_fast against the reference formulation (and HF ViTMAE when installed).

One training step = forward, backward and a fused AdamW update (as the trainer), bf16 autocast on CUDA (fp32 on
the CPU).
Before timing, every baseline must give the same loss as mae_fast on the same weights and noise. Steps of
the implementations alternate (order rotated each round) so a busy machine slows them alike; peak memory
is taken in a separate step per implementation, and "saved act" counts the bytes one forward keeps for
backward (unique storages, parameters excluded), which the CPU can measure too. ``mae_fast_lean`` is
mae_fast with ``set_lean_activations(True)`` (LayerNorm inputs and fc1 outputs kept, the rest recomputed).

    python bench/e2e.py                  # the GPU table (ViT-B/16 224 ... ViT-H/14 952)
    python bench/e2e.py --smoke          # CPU: ViT-S/16 at 112 and 224 px
    python bench/e2e.py --compile        # also with torch.compile on both sides
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mae_fast  # noqa: E402
from mae_fast.memory import saved_tensor_bytes  # noqa: E402
from mae_fast.models import mae_train_flops  # noqa: E402
from _timing import time_interleaved  # noqa: E402  (bench/_timing.py; e2e.time_interleaved for gpu_plan)
from reference_mae import ReferenceMAE  # noqa: E402

GPU_CONFIGS = [  # (model, img_size, batch)
    ("mae_vit_base_patch16", 224, 256),
    ("mae_vit_large_patch14", 224, 128),
    ("mae_vit_large_patch14", 476, 32),
    ("mae_vit_huge_patch14", 224, 96),
    ("mae_vit_huge_patch14", 476, 24),
    ("mae_vit_huge_patch14", 952, 4),
]
CPU_CONFIGS = [("mae_vit_small_patch16", 112, 8), ("mae_vit_small_patch16", 224, 4)]
# every implementation a row can have (--impls)
IMPLS = ("mae_fast", "mae_fast_lean", "mae_fast_lean_ckpt", "mae_fast_fused_ln", "reference", "hf_vitmae")
# what peak_mem_gib counts (results without this field count every resident model's weights)
PEAK_MEM_DEFINITION = "own weights + own optimizer state + everything the step allocates"


def measured_matmul_flops(device: torch.device) -> float:
    """The device's dense matmul rate (bf16 on CUDA, fp32 on the CPU) on random data."""
    n = 8192 if device.type == "cuda" else 2048
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dt), torch.randn(n, n, device=device, dtype=dt)
    times = []
    for i in range(13):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t)
    # the CPU's rate drifts with the other core's load and clocks: its best run is the peak MFU is taken against
    return 2 * n**3 / (min(times) if device.type == "cpu" else statistics.median(times))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_pair(name: str, img_size: int, device: torch.device):
    ours = mae_fast.create_model(name, img_size=img_size, norm_pix_loss=True)
    cfg = mae_fast.models.model_config(name, img_size=img_size, norm_pix_loss=True)
    ref = ReferenceMAE(**cfg)
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours.to(device), ref.to(device)


def build_models(name: str, img_size: int, device, with_hf: bool = True, checkpointed: int = 0) -> dict:
    """mae_fast, mae_fast with lean activations, the reference and (when installed) HF ViTMAE, same weights;
    with ``checkpointed`` > 0 also ``mae_fast_lean_ckpt``: lean with that many checkpointed blocks; on CUDA also
    ``mae_fast_fused_ln``: mae_fast with the Triton fused add + LayerNorm forced (see ``FORCED_ENV``)."""
    ours, ref = build_pair(name, img_size, device)
    lean = copy.deepcopy(ours)
    lean.set_lean_activations(True)
    models = {"mae_fast": ours, "mae_fast_lean": lean, "reference": ref}
    if torch.device(device).type == "cuda":  # on the CPU it would run in the Triton interpreter
        models["mae_fast_fused_ln"] = copy.deepcopy(ours)
    if checkpointed:
        models["mae_fast_lean_ckpt"] = copy.deepcopy(lean)
        models["mae_fast_lean_ckpt"].set_grad_checkpointing(checkpointed)
    try:
        hf = hf_vitmae(ours, device) if with_hf else None
    except Exception as e:  # noqa: BLE001 - a baseline we cannot build is reported, not fatal
        print(f"HF ViTMAE skipped: {type(e).__name__}: {e}", flush=True)
        hf = None
    if hf is not None:
        models["hf_vitmae"] = hf
    return models


def hf_vitmae(ours, device):
    """Hugging Face ViTMAEForPreTraining with SDPA and the same weights, or None when not installed."""
    try:
        from transformers import ViTMAEConfig, ViTMAEForPreTraining
    except Exception:  # noqa: BLE001
        return None
    dec = ours.decoder_blocks[0]
    cfg = ViTMAEConfig(hidden_size=ours.embed_dim, num_hidden_layers=ours.depth, num_attention_heads=ours.num_heads,
                       intermediate_size=int(ours.embed_dim * ours.mlp_ratio), image_size=ours.img_size[0],
                       patch_size=ours.patch_size, num_channels=ours.in_chans, qkv_bias=True,
                       decoder_hidden_size=ours.decoder_embed_dim, decoder_num_hidden_layers=ours.decoder_depth,
                       decoder_num_attention_heads=dec.attn.num_heads,
                       decoder_intermediate_size=int(ours.decoder_embed_dim * ours.mlp_ratio),
                       layer_norm_eps=1e-6, norm_pix_loss=ours.norm_pix_loss, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, attn_implementation="sdpa")
    hf = ViTMAEForPreTraining(cfg)
    src = ours.state_dict()
    dst = {}
    new_names = "vit.layers.0.attention.q_proj.weight" in hf.state_dict()  # transformers >= 5 layout
    enc_fmt, dec_fmt = ("vit.layers.{}", "decoder.decoder_layers.{}") if new_names else \
        ("vit.encoder.layer.{}", "decoder.decoder_layers.{}")
    if new_names:
        attn, names = "attention.{}_proj", (("attn.proj", "attention.o_proj"), ("mlp.fc1", "mlp.fc1"),
                                             ("mlp.fc2", "mlp.fc2"))
    else:
        attn, names = "attention.attention.{}", (("attn.proj", "attention.output.dense"),
                                                 ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense"))
    qkv_names = ("q", "k", "v") if new_names else ("query", "key", "value")

    def layer(prefix_src, prefix_dst, d):
        for part in ("weight", "bias"):
            for name, chunk in zip(qkv_names, src[f"{prefix_src}.attn.qkv.{part}"].split(d)):
                dst[f"{prefix_dst}.{attn.format(name)}.{part}"] = chunk
        for s_, t in (*names, ("norm1", "layernorm_before"), ("norm2", "layernorm_after")):
            dst[f"{prefix_dst}.{t}.weight"] = src[f"{prefix_src}.{s_}.weight"]
            dst[f"{prefix_dst}.{t}.bias"] = src[f"{prefix_src}.{s_}.bias"]

    for i in range(ours.depth):
        layer(f"blocks.{i}", enc_fmt.format(i), ours.embed_dim)
    for i in range(ours.decoder_depth):
        layer(f"decoder_blocks.{i}", dec_fmt.format(i), ours.decoder_embed_dim)
    dst.update({
        "vit.embeddings.cls_token": src["cls_token"], "vit.embeddings.position_embeddings": src["pos_embed"],
        "vit.embeddings.patch_embeddings.projection.weight": src["patch_embed.proj.weight"],
        "vit.embeddings.patch_embeddings.projection.bias": src["patch_embed.proj.bias"],
        "vit.layernorm.weight": src["norm.weight"], "vit.layernorm.bias": src["norm.bias"],
        "decoder.mask_token": src["mask_token"], "decoder.decoder_pos_embed": src["decoder_pos_embed"],
    })
    for s, t in (("decoder_embed", "decoder.decoder_embed"), ("decoder_norm", "decoder.decoder_norm"),
                 ("decoder_pred", "decoder.decoder_pred")):
        dst[f"{t}.weight"], dst[f"{t}.bias"] = src[f"{s}.weight"], src[f"{s}.bias"]
    missing, unexpected = hf.load_state_dict(dst, strict=False)
    if unexpected or [m for m in missing if "position" not in m]:
        raise RuntimeError(f"HF ViTMAE weight mapping incomplete: missing={missing[:4]}, unexpected={unexpected[:4]}")
    return hf.to(device)


# Backends an implementation runs with, set while its forward dispatches. The fused LayerNorm runs on GPUs before it
# is marked verified (the run then checks its loss against mae_fast's like every baseline's).
FORCED_ENV = {"mae_fast_fused_ln": {"MAE_FAST_BACKEND": "layer_norm=triton,add_layer_norm=triton",
                                    "MAE_FAST_TRITON_UNVERIFIED": "1"}}


def forced_env(kind):
    return env_vars(FORCED_ENV.get(kind, {}))


@contextlib.contextmanager
def env_vars(env: dict):
    """Environment variables set for the ``with`` block, restored (or removed) after it."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _loss(kind, model, imgs, noise):
    if kind.startswith("mae_fast"):
        with forced_env(kind):
            return model(imgs, 0.75, noise, masked_only=True).loss
    if kind == "reference":
        return model(imgs, 0.75, noise)[0]
    return model(pixel_values=imgs, noise=noise).loss


def check_same_loss(models: dict, device) -> dict:
    """Loss of each baseline minus mae_fast's on the same weights and noise (fp32, small batch)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    ours = models["mae_fast"]
    imgs = torch.randn(2, 3, *ours.img_size, generator=g).to(device)
    noise = torch.rand(2, ours.num_patches, generator=g).to(device)
    with torch.no_grad():
        base = _loss("mae_fast", ours, imgs, noise).item()
        diffs = {k: abs(_loss(k, m, imgs, noise).item() - base) for k, m in models.items() if k != "mae_fast"}
    for k, d in diffs.items():
        if d > 2e-3 * max(1.0, abs(base)):
            raise RuntimeError(f"{k} loss differs from mae_fast by {d:.3g}: not the same computation")
    return diffs


class Stepper:
    """One implementation's training step (forward, backward, AdamW), ready to be called repeatedly."""

    def __init__(self, kind, model, batch, device, compile_, compile_scope="model"):
        self.kind, self.model, self.batch, self.device = kind, model, batch, device
        model.train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, betas=(0.9, 0.95), fused=True)  # as train/pretrain.py
        self.fwd = model
        if compile_ and compile_scope == "blocks":
            # regional compilation, as the trainer's compile_scope=blocks: one graph per distinct block, compiled
            # once (minutes less for ViT-H); in place, so compiled rows must come after the eager ones
            for blk in [*model.blocks, *model.decoder_blocks]:
                blk.compile()
        elif compile_:
            self.fwd = torch.compile(model)
        self.imgs = torch.randn(batch, 3, *model_img_size(model), device=device)
        self.L = model_num_patches(model)

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    def __call__(self) -> float:
        noise = torch.rand(self.batch, self.L, device=self.device)
        _sync(self.device)
        t = time.perf_counter()
        with self.autocast():
            loss = _loss(self.kind, self.fwd, self.imgs, noise)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        _sync(self.device)
        return time.perf_counter() - t

    def peak_memory_gib(self) -> float | None:
        """Peak memory of one step attributable to this implementation: everything allocated during the step
        on top of what was resident before, plus its own parameters and optimizer state (other models'
        weights and optimizer states excluded): what this implementation alone needs on the device."""
        if self.device.type != "cuda":
            return None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        self()
        own = sum(p.numel() * p.element_size() for p in self.model.parameters())
        own += sum(t.numel() * t.element_size() for s in self.opt.state.values() for t in s.values()
                   if isinstance(t, torch.Tensor))
        return (torch.cuda.max_memory_allocated() - base + own) / 2**30

    def saved_activation_gib(self) -> float:
        """Bytes one forward keeps for backward (unique storages, parameters excluded): the activation memory,
        measurable on any device. Uses the eager model (compiled graphs save differently)."""
        noise = torch.rand(self.batch, self.L, device=self.device)
        with self.autocast():
            _, nbytes = saved_tensor_bytes(lambda: _loss(self.kind, self.model, self.imgs, noise), [self.model])
        return nbytes / 2**30


def model_img_size(model):
    return model.img_size if hasattr(model, "img_size") and isinstance(model.img_size, tuple) else \
        (model.config.image_size,) * 2 if hasattr(model, "config") else model.patch_embed.img_size


def model_num_patches(model):
    if hasattr(model, "config"):
        return (model.config.image_size // model.config.patch_size) ** 2
    return model.patch_embed.num_patches


def load_plans(path) -> dict:
    """{(model, img_size): checkpointed blocks} from a ``memory_estimate.py`` JSON: the lean plans that reach its
    memory target (configurations where lean alone does)."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or "target" not in data:  # what memory_estimate.py writes beside its rows
        raise ValueError("no memory 'target'")
    rows = data["rows"]
    return {(r["model"], r["img_size"]): r["checkpointed_blocks"] for r in rows if r["impl"] == "mae_fast_lean_ckpt"}


def run(configs, device, steps, warmup, compile_modes, with_hf=True, compile_only=None, impls=None, out=None,
        plans=None, compile_scope="model"):
    """Time every configuration; with ``out``, the JSON is rewritten after each one (a time limit keeps the rest).
    ``plans`` ({(model, img_size): blocks}, see :func:`load_plans`) adds a ``mae_fast_lean_ckpt`` row there."""
    peak_rate = measured_matmul_flops(device)
    rows = []
    for name, img_size, batch in configs:
        checkpointed = (plans or {}).get((name, img_size), 0)
        if device.type == "cuda":
            print(f"{name} {img_size}px batch {batch}: {torch.cuda.memory_allocated() / 2**30:.1f} GiB resident "
                  "before building", flush=True)
        models = build_models(name, img_size, device, with_hf, checkpointed)
        if impls:  # fewer resident models: each baseline's weights stay on the device for the whole configuration
            for kind in [k for k in models if k not in impls and k != "mae_fast"]:
                del models[kind]
        ours = models["mae_fast"]
        for kind in [k for k in models if k in FORCED_ENV]:  # experimental rows: a wrong loss drops the row only
            try:
                check_same_loss({"mae_fast": ours, kind: models[kind]}, device)
            except RuntimeError as e:
                print(f"{kind} dropped: {e}", flush=True)
                del models[kind]
        diffs = check_same_loss(models, device)
        flops = mae_train_flops(ours, 0.75) * batch
        for compile_ in compile_modes:
            if compile_ and compile_only and f"{name}:{img_size}" not in compile_only:
                continue
            steppers = {}
            for kind, model in models.items():
                if impls and kind not in impls:
                    continue
                if compile_ and kind in ("hf_vitmae", "mae_fast_fused_ln"):
                    continue  # HF compiles slowly, and compile fuses the LayerNorms itself
                steppers[kind] = Stepper(kind, model, batch, device, compile_, compile_scope)
            try:
                times = time_interleaved(steppers, steps, warmup)
                peaks = {k: st.peak_memory_gib() for k, st in steppers.items()}
                acts = {k: None if compile_ else st.saved_activation_gib() for k, st in steppers.items()}
            except torch.OutOfMemoryError:
                rows += [dict(model=name, img_size=img_size, batch=batch, impl=k, compile=compile_, oom=True)
                         for k in steppers]
                print(f"{name} {img_size}px batch {batch} compile={compile_}: out of memory with "
                      f"{len(steppers)} implementations resident ({', '.join(steppers)})", flush=True)
                del steppers
                for m in models.values():  # the next compile mode reuses the models
                    m.zero_grad(set_to_none=True)
                _release(device)
                continue
            for kind, ts in times.items():
                med = statistics.median(ts)
                q = statistics.quantiles(ts, n=4) if len(ts) >= 4 else None
                rows.append(dict(model=name, img_size=img_size, batch=batch, impl=kind, compile=compile_,
                                 compile_scope=compile_scope if compile_ else None,
                                 checkpointed_blocks=checkpointed if kind == "mae_fast_lean_ckpt" else 0,
                                 step_ms_median=med * 1e3, step_ms_iqr=(q[2] - q[0]) * 1e3 if q else None,
                                 step_ms_all=[t * 1e3 for t in ts], images_per_s=batch / med,
                                 peak_mem_gib=peaks[kind], saved_act_gib=acts[kind],
                                 mfu=flops / med / peak_rate, loss_diff_vs_mae_fast=diffs.get(kind, 0.0)))
                print(_fmt(rows[-1]), flush=True)
            del steppers
        del ours, models
        _release(device)
        if out:
            _write(out, _result(device, peak_rate, rows))
    return _result(device, peak_rate, rows)


def _release(device) -> None:
    """Free what dropped models left cached: compiled graphs (dynamo's caches hold the modules they were traced
    from) and the allocator's blocks. On a GPU that is not enough (a finished ViT-H/14 configuration left
    44.8 GiB resident, ``bench/results/nvidia-h100-2026-11-23-e2e.md``), hence a child process per
    configuration there (:func:`run_isolated`); kept for the in-process path."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _result(device, peak_rate, rows) -> dict:
    add_ratios(rows)
    return dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                torch=torch.__version__, date=time.strftime("%Y-%m-%d"), matmul_flops=peak_rate,
                peak_mem_definition=PEAK_MEM_DEFINITION, rows=rows)


def add_ratios(rows) -> None:
    """Ratios against the reference of the same model, size and compile mode, measured side by side."""
    for row in rows:
        ref_row = next((r for r in rows if r["impl"] == "reference" and r["model"] == row["model"]
                        and r["img_size"] == row["img_size"] and r["compile"] == row["compile"]
                        and not r.get("oom")), None)
        if ref_row is None or row.get("oom"):
            continue
        row["speedup_vs_reference"] = ref_row["step_ms_median"] / row["step_ms_median"]
        # paired: the reference's step over this one's in the same round (robust to drift), median and IQR
        pairs = [a / b for a, b in zip(ref_row.get("step_ms_all", []), row.get("step_ms_all", []))]
        if len(pairs) >= 4:
            q = statistics.quantiles(pairs, n=4)
            row["speedup_vs_reference_paired"] = statistics.median(pairs)
            row["speedup_vs_reference_paired_iqr"] = [q[0], q[2]]
        eager_ref = next((r for r in rows if r["impl"] == "reference" and r["model"] == row["model"]
                          and r["img_size"] == row["img_size"] and not r["compile"] and not r.get("oom")), None)
        if row["compile"] and eager_ref is not None:
            # compiled mae_fast against the reference as the official code runs it (eager): what a user gains
            row["speedup_vs_eager_reference"] = eager_ref["step_ms_median"] / row["step_ms_median"]
        if row["peak_mem_gib"] and ref_row["peak_mem_gib"]:
            row["mem_vs_reference"] = row["peak_mem_gib"] / ref_row["peak_mem_gib"]
        if row.get("saved_act_gib") and ref_row.get("saved_act_gib"):
            row["act_vs_reference"] = row["saved_act_gib"] / ref_row["saved_act_gib"]


def _fmt(r):
    if r.get("oom"):
        return f"{r['model']:<24}{r['img_size']:>5} {r['impl']:<10} compile={r['compile']!s:<5} OOM"
    mem = f"{r['peak_mem_gib']:.1f} GiB" if r["peak_mem_gib"] else "-"
    act = f"{r['saved_act_gib']:.2f} GiB saved" if r.get("saved_act_gib") else ""
    return (f"{r['model']:<24}{r['img_size']:>5} b={r['batch']:<4}{r['impl']:<10} compile={r['compile']!s:<5} "
            f"{r['step_ms_median']:9.1f} ms {r['images_per_s']:8.1f} img/s  MFU {100 * r['mfu']:5.1f}%  {mem}  {act}")


def table(result) -> str:
    lines = ["| model | px | batch | compile | impl | step ms (IQR) | img/s | MFU | peak GiB | saved act GiB | "
             "speed vs reference | peak mem vs reference | saved act vs reference |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if r.get("oom"):
            lines.append(f"| {r['model']} | {r['img_size']} | {r['batch']} | {r['compile']} | {r['impl']} | OOM "
                         "| | | | | | | |")
            continue
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] else "-"
        act = f"{r['saved_act_gib']:.3f}" if r.get("saved_act_gib") else "-"
        iqr = f" ({r['step_ms_iqr']:.1f})" if r.get("step_ms_iqr") is not None else ""
        sp = f"{r['speedup_vs_reference']:.2f}x" if "speedup_vs_reference" in r else ""
        if "speedup_vs_reference_paired" in r and r["impl"] != "reference":
            lo, hi = r["speedup_vs_reference_paired_iqr"]
            sp += f" (paired {r['speedup_vs_reference_paired']:.3f}x, IQR {lo:.2f}-{hi:.2f})"
        if "speedup_vs_eager_reference" in r:
            sp += f"; {r['speedup_vs_eager_reference']:.2f}x eager reference"
        mr = f"{r['mem_vs_reference']:.2f}" if "mem_vs_reference" in r else ""
        ar = f"{r['act_vs_reference']:.2f}" if "act_vs_reference" in r else ""
        lines.append(f"| {r['model']} | {r['img_size']} | {r['batch']} | {r['compile']} | {r['impl']} | "
                     f"{r['step_ms_median']:.1f}{iqr} | {r['images_per_s']:.1f} | {100 * r['mfu']:.1f}% | {mem} | "
                     f"{act} | {sp} | {mr} | {ar} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="small CPU configuration")
    ap.add_argument("--compile", action="store_true", help="also time with torch.compile on both sides")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--only", default=None, help="comma list of model:px to run, e.g. mae_vit_huge_patch14:476")
    ap.add_argument("--compile-only", default=None, help="with --compile: only these model:px (comma list)")
    ap.add_argument("--compile-scope", choices=("model", "blocks"), default="model",
                    help="with --compile: the whole model, or each transformer block (regional: compiles in a "
                         "fraction of the time)")
    ap.add_argument("--no-hf", action="store_true", help="skip the Hugging Face ViTMAE baseline")
    ap.add_argument("--impls", default=None, help="comma list of implementations to time (default: all)")
    ap.add_argument("--plans", default=None, help="a memory_estimate.py JSON: also time lean with its checkpointed "
                                                  "blocks where lean alone misses the memory target")
    ap.add_argument("--out", default=None, help="write JSON here")
    ap.add_argument("--in-process", action="store_true",
                    help="on a GPU, run every configuration in this process (default: one child process each, "
                         "since memory a configuration leaves behind, compiled graphs included, starved the next)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    configs = CPU_CONFIGS if device.type == "cpu" else GPU_CONFIGS
    if args.only:  # in the order given, so a time limit cuts the least wanted
        order = [tuple(s.split(":")) for s in args.only.split(",")]
        table_ = [(c[0], str(c[1])) for c in configs]
        unknown = [":".join(o) for o in order if o not in table_]
        if unknown:
            ap.error(f"--only {','.join(unknown)}: not in the {device.type} table "
                     f"({', '.join(f'{m}:{p}' for m, p in table_)})")
        configs = sorted((c for c in configs if (c[0], str(c[1])) in order), key=lambda c: order.index((c[0], str(c[1]))))
    if args.impls and set(args.impls.split(",")) - set(IMPLS):
        ap.error(f"--impls {','.join(sorted(set(args.impls.split(',')) - set(IMPLS)))}: unknown "
                 f"(known: {', '.join(IMPLS)})")
    plans = None
    if args.plans:
        try:
            plans = load_plans(args.plans)
        except OSError as e:
            ap.error(f"--plans {args.plans}: {e.strerror}")
        except (ValueError, KeyError, TypeError) as e:
            ap.error(f"--plans {args.plans}: not a memory_estimate.py JSON ({type(e).__name__}: {e})")
    steps = args.steps or (5 if device.type == "cpu" else 10)
    warmup = args.warmup or (2 if device.type == "cpu" else 3)
    if device.type == "cuda" and len(configs) > 1 and not args.in_process:
        result = run_isolated(configs, argv if argv is not None else sys.argv[1:], args.out)
        print("\n" + table(result))
        return result
    result = run(configs, device, steps, warmup, [False, True] if args.compile else [False], with_hf=not args.no_hf,
                 compile_only=set(args.compile_only.split(",")) if args.compile_only else None,
                 impls=set(args.impls.split(",")) if args.impls else None, out=args.out,
                 plans=plans, compile_scope=args.compile_scope)
    print("\n" + table(result))
    if args.out:
        _write(args.out, result)
    return result


def run_isolated(configs, argv, out) -> dict:
    """Each configuration in a child process (same arguments, ``--only`` that one); rows merged in order and the
    merged JSON rewritten after each, so a time limit keeps what finished."""
    import subprocess
    import tempfile

    rows, result = [], None
    keep = _drop_option(_drop_option(argv, "--only"), "--out")
    for name, img_size, _ in configs:
        with tempfile.TemporaryDirectory() as tmp:
            part = Path(tmp) / "part.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), *keep, "--in-process", "--only",
                   f"{name}:{img_size}", "--out", str(part)]
            rc = subprocess.run(cmd).returncode
            if not part.exists():
                print(f"{name} {img_size}px: child exited with {rc} and no result", flush=True)
                continue
            sub = json.loads(part.read_text())
        rows += sub["rows"]
        result = dict(sub, rows=rows)
        add_ratios(rows)
        if out:
            _write(out, result)
    if result is None:
        raise SystemExit("no configuration produced a result")
    return result


def _drop_option(argv, flag) -> list:
    """argv without ``flag VALUE`` / ``flag=VALUE``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(flag + "="):
            out.append(a)
    return out


def _write(path, result) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(p)  # atomic: a reader or a kill never sees half a file


if __name__ == "__main__":
    main()
