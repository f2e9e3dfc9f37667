"""The `tiny` checkpoint: the real Wan 2.1 classes with tiny, seeded random weights.

Built once on first use into the cache directory with `save_pretrained`, in the same
layout as `Wan-AI/Wan2.1-T2V-1.3B-Diffusers` (model_index.json + one folder per
component), and loaded back with the same `from_pretrained` code a real checkpoint uses.
Nothing is downloaded: the tokenizer is trained locally with `tokenizers`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock

logger = logging.getLogger(__name__)

# Changing any of these changes the weights: the cache key includes them.
TRANSFORMER_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=4,
    attention_head_dim=12,
    in_channels=16,
    out_channels=16,
    text_dim=32,
    freq_dim=256,
    ffn_dim=64,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=64,
)
VAE_CONFIG = dict(
    base_dim=3,
    z_dim=16,
    dim_mult=[1, 1, 1, 1],
    num_res_blocks=1,
    temperal_downsample=[False, True, True],
)
TEXT_ENCODER_CONFIG = dict(
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=32,
    dropout_rate=0.0,
)
SCHEDULER_CONFIG = dict(shift=3.0)
TOKENIZER_VOCAB = 2000
SEED = 0
RECIPE_VERSION = 2  # 2: the VAE decoder's weights are re-initialised so its frames follow the latents

# A small bilingual corpus: enough for a byte-level BPE to learn common pieces. Any text
# still tokenizes (byte fallback), so prompts are never rejected by the tokenizer.
_CORPUS = [
    "a cat chasing butterflies under a cherry blossom tree, photorealistic, natural lighting",
    "一只橘猫在樱花树下追逐蝴蝶",
    "主体:熊猫;动作:吃竹子;场景:竹林;风格:3D动画",
    "subject: panda; action: eating bamboo; scene: bamboo forest; style: 3D animation",
    "cinematic shot, anamorphic lens, film grain, dramatic lighting, slow camera pan",
    "anime style, cel shading, vibrant colors, a girl running along the beach at sunset",
    "Chinese ink wash painting, 水墨画, mountains and rivers, flowing brush strokes",
    "不要出现人类角色, no humans, no text, no watermark, 第3秒出现彩虹, at 3s: a rainbow",
    "a drone shot over a city at night, neon lights, rain, reflections on the street",
    "温暖的色调, 冷色调, 镜头缓慢推进, 镜头平移, 静止镜头, 高清, 细节丰富",
    "warm colors, cool colors, zoom in, pan left, static camera, highly detailed, 4k",
    "低质量, 模糊, 过曝, 字幕, 水印, low quality, blurry, overexposed, subtitles, watermark",
]


def recipe_hash() -> str:
    """Hash of everything that determines the tiny checkpoint's contents."""
    recipe = json.dumps(
        [TRANSFORMER_CONFIG, VAE_CONFIG, TEXT_ENCODER_CONFIG, SCHEDULER_CONFIG, TOKENIZER_VOCAB, SEED,
         RECIPE_VERSION, _CORPUS],
        sort_keys=True,
        ensure_ascii=False,
        default=list,
    )
    return hashlib.sha256(recipe.encode()).hexdigest()[:12]


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]  # T5 ids: pad=0, eos=1, unk=2
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    # T5 appends </s> to every sequence.
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )


def _build(target: Path) -> None:
    import torch
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = _train_tokenizer()
    torch.manual_seed(SEED)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), **TEXT_ENCODER_CONFIG)).eval()
    torch.manual_seed(SEED)
    transformer = WanTransformer3DModel(**TRANSFORMER_CONFIG).eval()
    torch.manual_seed(SEED)
    vae = AutoencoderKLWan(**VAE_CONFIG).eval()
    _make_decoder_follow_latents(vae, torch.Generator().manual_seed(SEED + 1))
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                       transformer=transformer)
    pipe.save_pretrained(target)


def _make_decoder_follow_latents(vae, generator) -> None:
    """Re-initialise the VAE decoder so that its frames depend on the latents, smoothly in time.

    With PyTorch's default init the decoder's conv biases (~U(+-1/sqrt(fan_in))) outweigh its
    shrinking signal (weight variance 1/(3 fan_in) per layer), and its per-pixel RMS norms turn what
    is left into a bias-driven picture: two independent latent videos decode ~2/255 apart. Here:
    - every conv (and `post_quant_conv`) draws He-normal weights (variance 2/fan_in) and no bias, so
      the latents' signal keeps its scale through the decoder;
    - the causal 3D convs keep only their current-frame taps (a per-frame 2D network), and each
      temporal upsampler (`time_conv`, dim -> 2 dim) interpolates linearly: its first output frame is
      the mean of the previous and the current input frame, its second the current one. A static
      latent video decodes to static frames; frames change as smoothly as the latents do.
    Same modules and shapes (the config is unchanged), so the decode cost is the same.
    """
    import math

    import torch

    with torch.no_grad():
        for name, module in [("post_quant_conv", vae.post_quant_conv), *vae.decoder.named_modules()]:
            if not isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)):
                continue
            weight = module.weight
            if name.endswith("time_conv"):
                dim = weight.shape[1]
                eye = torch.eye(dim)
                weight.zero_()
                weight[:dim, :, -2, 0, 0] = 0.5 * eye
                weight[:dim, :, -1, 0, 0] = 0.5 * eye
                weight[dim:, :, -1, 0, 0] = eye
            else:
                fresh = torch.zeros_like(weight)
                current = fresh[:, :, -1] if weight.dim() == 5 else fresh  # causal: the last tap is frame t
                fan_in = current[0].numel()
                current.copy_(torch.randn(current.shape, generator=generator) * math.sqrt(2.0 / fan_in))
                weight.copy_(fresh)
            if module.bias is not None:
                module.bias.zero_()


def build_once(target: Path, build, marker: str = "model_index.json") -> Path:
    """Build the directory `target` with `build(tmp_dir)` unless it exists (holds `marker`); return it.

    Safe to call from several processes at once (a file lock serialises the build; the
    directory appears atomically by rename, so a reader never sees half of it).
    """
    target = Path(target)
    if (target / marker).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / marker).exists():
            return target
        logger.info("building %s", target)
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
        try:
            build(tmp)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_tiny_checkpoint(cache_dir: Path) -> Path:
    """Return the path of the tiny checkpoint, building it first if it is not cached (see `build_once`)."""
    return build_once(Path(cache_dir) / f"wan-tiny-{recipe_hash()}", _build)


# --- Style LoRA adapters of the tiny checkpoint -----------------------------------------------
# Two seeded random LoRAs (rank TINY_LORA_RANK on every attention and feed-forward linear of the
# blocks), saved in diffusers' LoRA format (`save_lora_weights`: pytorch_lora_weights.safetensors
# with the LoraConfig as metadata), so styles that name `builtin:tiny-lora/<name>` exercise the
# same loader a real adapter goes through.
TINY_LORAS = ("ink-wash", "cinematic")
TINY_LORA_RANK = 4
TINY_LORA_ALPHA = 8
TINY_LORA_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                     "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2")
TINY_LORA_STRENGTH = 0.5  # |delta W| relative to a unit-variance weight: enough to change every output clearly


def _build_loras(target: Path) -> None:
    import torch
    from accelerate import init_empty_weights
    from diffusers import WanPipeline, WanTransformer3DModel

    with init_empty_weights():
        shapes = WanTransformer3DModel(**TRANSFORMER_CONFIG)
    linears = {name: (m.out_features, m.in_features) for name, m in shapes.named_modules()
               if isinstance(m, torch.nn.Linear) and name.startswith("blocks.")
               and name.split(".", 2)[2] in TINY_LORA_TARGETS}
    for index, style in enumerate(TINY_LORAS):
        generator = torch.Generator().manual_seed(SEED * 1000 + 1 + index)
        layers = {}
        for name, (out_f, in_f) in sorted(linears.items()):
            layers[f"{name}.lora_A.weight"] = torch.randn(TINY_LORA_RANK, in_f, generator=generator) / in_f ** 0.5
            layers[f"{name}.lora_B.weight"] = (torch.randn(out_f, TINY_LORA_RANK, generator=generator)
                                               * TINY_LORA_STRENGTH / TINY_LORA_RANK ** 0.5)
        WanPipeline.save_lora_weights(
            target / style, transformer_lora_layers=layers,
            transformer_lora_adapter_metadata={"r": TINY_LORA_RANK, "lora_alpha": TINY_LORA_ALPHA,
                                               "target_modules": sorted(linears)},
        )
    (target / "DONE").write_text("\n".join(TINY_LORAS) + "\n")


def ensure_tiny_loras(cache_dir: Path) -> Path:
    """Directory holding one diffusers LoRA folder per name in `TINY_LORAS` (built once, atomically)."""
    recipe = json.dumps([recipe_hash(), TINY_LORAS, TINY_LORA_RANK, TINY_LORA_ALPHA, TINY_LORA_TARGETS,
                         TINY_LORA_STRENGTH], sort_keys=True)
    digest = hashlib.sha256(recipe.encode()).hexdigest()[:12]
    return build_once(Path(cache_dir) / f"wan-tiny-loras-{digest}", _build_loras, marker="DONE")
