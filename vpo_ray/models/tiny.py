"""The `tiny` preset: random-weight models of the real classes, built offline.

Every builder here writes a directory with `save_pretrained`, so tiny models load through
exactly the `from_pretrained` code path that real checkpoints use (registry.py). Builds
are deterministic: tokenizers come from a fixed built-in corpus (a BPE trained with the
`tokenizers` library, a Unigram vocabulary counted in Python) and weights are drawn from
a seeded torch generator, so two builds give identical weights and vocabularies. Architecture
sizes live in JSON files under `configs/tiny/` (shipped with the package); token ids and
vocabulary sizes are filled in from the tokenizer at build time.

Call `registry.model_path(spec)` (or `build_cached(name)`) rather than these builders: a build
is cached under $VPO_CACHE and guarded by a file lock.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Callable

# Bump when any builder below changes what it writes: the cache key includes it.
BUILDER_VERSION = 4
CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "tiny"

# Special tokens of the chat tokenizer (ChatML layout, as Qwen2 / Qwen2-VL use).
BOS, EOS, PAD = "<|startoftext|>", "<|im_end|>", "<|endoftext|>"
CHAT_SPECIAL_TOKENS = [PAD, "<|im_start|>", EOS, BOS,
                       "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
CHAT_VOCAB_SIZE = 2048  # BPE target; the built-in corpus yields somewhat fewer
T5_VOCAB_SIZE = 1024  # upper bound; the corpus has fewer distinct words (~330 pieces)

# ChatML with the `{% generation %}` markers TRL needs for assistant-only loss; content
# may be a string or a Qwen2-VL style list of {"type": "text"|"image"|"video"} parts.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
    "{%- else -%}{%- set ns = namespace(text='') -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set ns.text = ns.text + '<|vision_start|><|image_pad|><|vision_end|>' -%}"
    "{%- elif part['type'] == 'video' -%}{%- set ns.text = ns.text + '<|vision_start|><|video_pad|><|vision_end|>' -%}"
    "{%- elif part['type'] == 'text' -%}{%- set ns.text = ns.text + part['text'] -%}"
    "{%- endif -%}{%- endfor -%}{%- set text = ns.text -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\n' -}}{% generation %}{{- text + '<|im_end|>' -}}{% endgeneration %}{{- '\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' + text + '<|im_end|>\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)

_SUBJECTS = ("a cat", "a dog", "an astronaut", "a robot", "a young woman", "an old man", "a horse", "a panda",
             "a red car", "a sailboat", "a dragon", "a child", "a chef", "a fox", "a butterfly", "a train",
             "a golden retriever", "a jellyfish", "a samurai", "a hummingbird", "a vintage airplane",
             "a street musician", "an elephant", "a giant whale", "a ballerina", "a teddy bear")
_ACTIONS = ("running", "dancing", "walking slowly", "jumping", "flying", "swimming", "playing piano",
            "cooking dinner", "reading a book", "riding a bicycle", "surfing a wave", "sleeping",
            "painting a portrait", "climbing a tree", "drifting through clouds", "spinning gracefully",
            "exploring ruins", "chasing bubbles")
_SCENES = ("on a sunny beach", "in a snowy forest", "in a neon-lit city at night", "on the surface of the moon",
           "in a cozy living room", "under the sea", "in a field of flowers", "on a mountain top",
           "in a busy market", "inside a spaceship", "by a quiet lake at dawn", "in the rain",
           "across a desert at sunset", "in a misty bamboo grove", "on a futuristic rooftop garden",
           "inside an ancient library", "along a waterfall canyon", "through a glowing crystal cave")
_CAMERA = ("the camera slowly pans left", "a close-up shot", "a wide aerial shot", "the camera zooms in",
           "a tracking shot follows the subject", "static camera, cinematic lighting",
           "soft golden hour light", "dramatic shadows, high contrast", "shallow depth of field, 4k",
           "handheld camera, documentary style", "slow motion, vibrant colors", "time-lapse, moody atmosphere",
           "dolly shot, warm color grading", "overhead drone view, crisp details", "photorealistic, volumetric fog")
_QUESTIONS = ("Is the prompt harmless?", "Does the video show the main subject?", "Is the motion smooth?",
              "Is the video sharp and free of visual artifacts?", "Do objects obey physical laws?")


def _corpus() -> list[str]:
    """The fixed text the tokenizers are trained on: templates plus video vocabulary."""
    from vpo_ray import prompts

    texts = [prompts.OPTIMIZER_SYSTEM, prompts.OPTIMIZER_TEMPLATE, prompts.JUDGE_SYSTEM,
             prompts.JUDGE_TEMPLATE, prompts.REFINE_TEMPLATE, prompts.VIDEO_JUDGE_TEMPLATE,
             prompts.JUDGE_ANSWER_PREFIX]
    for q, p in prompts.FEW_SHOT_EXAMPLES:
        texts += [q, p]
    i = 0
    for s in _SUBJECTS:
        for a in _ACTIONS:
            for scene in _SCENES:
                cam = _CAMERA[i % len(_CAMERA)]
                texts.append(f"{s.capitalize()} {a} {scene}, {cam}.")
                i += 1
    # The judges read Yes/No from next-token probabilities: make every casing and
    # leading-space variant frequent enough to become one BPE token.
    for q in _QUESTIONS:
        for ans in ("Yes", "No", "yes", "no"):
            texts += [f"{q} {ans}", f"{ans}", f"{prompts.JUDGE_ANSWER_PREFIX} {ans}", f"Answer: {ans}."]
    return texts


@functools.lru_cache(maxsize=1)
def _trained_bpe() -> str:
    """The trained BPE model as JSON (cached: three builders share it)."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=CHAT_VOCAB_SIZE, min_frequency=2, show_progress=False,
                                  special_tokens=CHAT_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok.to_str()


def train_chat_tokenizer():
    """Byte-level BPE trained on the built-in corpus, wrapped as a Qwen2Tokenizer.

    Normalizer and pre-tokenizer are Qwen2's, so the tokenizer encodes the same whether
    it is loaded as Qwen2Tokenizer (AutoTokenizer's choice for a qwen2 config) or read
    straight from tokenizer.json.
    """
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    model = json.loads(_trained_bpe())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    fast = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                          unk_token=PAD, model_max_length=2048, padding_side="left",
                          clean_up_tokenization_spaces=False)
    fast.add_tokens([AddedToken(t, special=True, normalized=False) for t in CHAT_SPECIAL_TOKENS],
                    special_tokens=True)
    fast.chat_template = CHAT_TEMPLATE
    for word in ("Yes", " Yes", "No", " No"):
        ids = fast.encode(word, add_special_tokens=False)
        if len(ids) != 1:  # a corpus change broke the judge's contract; fail the build loudly
            raise RuntimeError(f"tiny tokenizer encodes {word!r} as {len(ids)} tokens, expected 1")
    return fast


def _unigram_vocab() -> list[tuple[str, float]]:
    """A SentencePiece-style vocabulary counted from the corpus: frequent words, then characters.

    Counted in Python rather than trained with tokenizers' UnigramTrainer, whose EM gives
    slightly different scores from run to run; this is identical every time.
    """
    import math
    import re
    from collections import Counter

    words, chars = Counter(), Counter()
    for text in _corpus():
        for token in re.findall(r"\w+|[^\w\s]", text):
            words["▁" + token] += 1
            chars.update(token)
    total = sum(words.values()) + sum(chars.values())
    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]  # T5 layout: pad=0, eos=1, unk=2
    # characters are the fallback that can spell anything; a big penalty keeps them last resort
    fallback = [("▁", math.log(1 / total))] + [(c, math.log(n / total) - 10.0) for c, n in sorted(chars.items())]
    room = T5_VOCAB_SIZE - len(specials) - len(fallback)
    frequent = sorted(((w, n) for w, n in words.items() if n >= 2), key=lambda kv: (-kv[1], kv[0]))[:room]
    return specials + [(w, math.log(n / total)) for w, n in frequent] + fallback


def train_t5_tokenizer():
    """A Unigram (SentencePiece-style) T5Tokenizer over a vocabulary counted from the corpus."""
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=_unigram_vocab(), extra_ids=0, model_max_length=512)


def _config(name: str) -> dict:
    """A shipped tiny config without its `_comment` keys."""
    data = json.loads((CONFIG_DIR / f"{name}.json").read_text())
    return {k: v for k, v in data.items() if not k.startswith("_")}


def _token_ids(tok) -> dict:
    return {"bos_token_id": tok.convert_tokens_to_ids(BOS), "eos_token_id": tok.convert_tokens_to_ids(EOS),
            "pad_token_id": tok.convert_tokens_to_ids(PAD)}


def _seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def _generation_config(tok):
    from transformers import GenerationConfig

    ids = _token_ids(tok)
    # Stop on <|im_end|> (end of turn) or <|endoftext|>, as Qwen2 instruct models do.
    return GenerationConfig(bos_token_id=ids["bos_token_id"], pad_token_id=ids["pad_token_id"],
                            eos_token_id=[ids["eos_token_id"], ids["pad_token_id"]])


def build_causal_lm(out_dir: str, seed: int) -> None:
    """tiny-optimizer / tiny-judge: Qwen2ForCausalLM + chat tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = train_chat_tokenizer()
    cfg = _config("qwen2_lm")
    cfg.pop("model_type", None)
    config = Qwen2Config(vocab_size=len(tok), **cfg, **_token_ids(tok))
    _seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.float32).eval()
    model.generation_config = _generation_config(tok)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


def _t5_text_encoder(kind: str, tok, seed: int):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    cfg = _config("t5_encoder" if kind == "t5" else "umt5_encoder")
    cfg_cls, model_cls = (T5Config, T5EncoderModel) if kind == "t5" else (UMT5Config, UMT5EncoderModel)
    config = cfg_cls(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                     decoder_start_token_id=tok.pad_token_id, **cfg)
    _seed(seed)
    return model_cls(config).eval()


def build_cogvideox(out_dir: str, seed: int) -> None:
    """tiny-t2v: CogVideoXPipeline (T5 text encoder, CogVideoX transformer and VAE)."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDPMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    tok = train_t5_tokenizer()
    text_encoder = _t5_text_encoder("t5", tok, seed)
    _seed(seed + 1)
    transformer = CogVideoXTransformer3DModel(**_config("cogvideox_transformer")).eval()
    _seed(seed + 2)
    vae = AutoencoderKLCogVideoX(**_config("cogvideox_vae")).eval()
    # CogVideoX's schedule: v-prediction, zero-terminal-SNR betas, trailing timesteps.
    scheduler = CogVideoXDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                      prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                      timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False,
                                      snr_shift_scale=3.0)
    pipe = CogVideoXPipeline(tokenizer=tok, text_encoder=text_encoder, vae=vae, transformer=transformer,
                             scheduler=scheduler)
    pipe.save_pretrained(out_dir)


def build_wan(out_dir: str, seed: int) -> None:
    """tiny-wan: WanPipeline (UMT5 text encoder, Wan transformer and VAE, UniPC flow scheduler)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    tok = train_t5_tokenizer()
    text_encoder = _t5_text_encoder("umt5", tok, seed)
    _seed(seed + 1)
    transformer = WanTransformer3DModel(**_config("wan_transformer")).eval()
    _seed(seed + 2)
    vae = AutoencoderKLWan(**_config("wan_vae")).eval()
    # Wan2.1-T2V-1.3B-Diffusers ships UniPC with flow sigmas, shift 3.0 (480p).
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=3.0)
    pipe = WanPipeline(tokenizer=tok, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                       transformer=transformer)
    pipe.save_pretrained(out_dir)


def build_video_judge(out_dir: str, seed: int) -> None:
    """tiny-video-judge: Qwen2VLForConditionalGeneration + tokenizer + PIL Qwen2-VL image processor.

    No Qwen2VLProcessor is saved: building one needs the video processor, which needs
    torchvision; registry.load_video_judge assembles a light processor from the parts.
    """
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = train_chat_tokenizer()
    cfg = _config("qwen2_vl")
    cfg.pop("model_type", None)
    pixels = cfg.pop("image_processor")
    ids = _token_ids(tok)
    text_config = dict(cfg.pop("text_config"), vocab_size=len(tok), **ids)
    config = Qwen2VLConfig(
        text_config=text_config, vision_config=cfg.pop("vision_config"),
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"), **cfg)
    _seed(seed)
    model = Qwen2VLForConditionalGeneration(config).to(torch.float32).eval()
    model.generation_config = _generation_config(tok)
    model.save_pretrained(out_dir)
    vis = config.vision_config
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=pixels["min_pixels"], max_pixels=pixels["max_pixels"], patch_size=vis.patch_size,
        temporal_patch_size=vis.temporal_patch_size, merge_size=vis.spatial_merge_size)
    image_processor.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


# name -> (builder, seed). Seeds differ so optimizer and judge are different networks.
BUILDERS: dict[str, tuple[Callable[[str, int], None], int]] = {
    "tiny-optimizer": (build_causal_lm, 1),
    "tiny-judge": (build_causal_lm, 2),
    "tiny-t2v": (build_cogvideox, 3),
    "tiny-wan": (build_wan, 4),
    "tiny-video-judge": (build_video_judge, 5),
    "tiny-video-judge-2": (build_video_judge, 6),
}

_CONFIG_FILES = {
    "tiny-optimizer": ("qwen2_lm",), "tiny-judge": ("qwen2_lm",),
    "tiny-t2v": ("t5_encoder", "cogvideox_transformer", "cogvideox_vae"),
    "tiny-wan": ("umt5_encoder", "wan_transformer", "wan_vae"),
    "tiny-video-judge": ("qwen2_vl",), "tiny-video-judge-2": ("qwen2_vl",),
}


@functools.lru_cache(maxsize=None)
def fingerprint(name: str) -> str:
    """Cache key of a tiny build: builder version, its configs, corpus, library versions."""
    from importlib.metadata import version  # not `import transformers`: a cache hit stays cheap

    h = hashlib.sha256()
    h.update(f"{name}|{BUILDER_VERSION}|{BUILDERS[name][1]}|".encode())
    # A different major.minor library may save a different layout: rebuild rather than guess.
    for lib in ("transformers", "diffusers", "tokenizers"):
        h.update(".".join(version(lib).split(".")[:2]).encode() + b"|")
    for cfg in _CONFIG_FILES[name]:
        h.update((CONFIG_DIR / f"{cfg}.json").read_bytes())
    h.update(json.dumps(_corpus()).encode())
    h.update(CHAT_TEMPLATE.encode())
    return h.hexdigest()[:12]


def build(name: str, out_dir: str) -> None:
    """Build tiny model `name` into the (new, empty) directory `out_dir`."""
    if name not in BUILDERS:
        raise KeyError(f"no tiny builder named {name!r} (known: {', '.join(BUILDERS)})")
    builder, seed = BUILDERS[name]
    os.makedirs(out_dir, exist_ok=True)
    builder(out_dir, seed)


# ---------------------------------------------------------------------------- the build cache

def cache_root() -> Path:
    """$VPO_CACHE (default ~/.cache/vpo_ray): where tiny models are built."""
    return Path(os.environ.get("VPO_CACHE") or "~/.cache/vpo_ray").expanduser()


def build_cached(name: str) -> str:
    """The directory of tiny model `name`, built once under $VPO_CACHE/tiny (file-locked across processes)."""
    import shutil
    import uuid

    from filelock import FileLock

    root = cache_root() / "tiny"
    fp = fingerprint(name)
    final = root / f"{name}-{fp}"
    if final.is_dir():  # finished builds appear by atomic rename, so existing means complete
        return str(final)
    root.mkdir(parents=True, exist_ok=True)
    # One builder per name at a time across processes (parallel Ray actors on one node
    # or on a shared filesystem); the others wait, then find the finished directory.
    with FileLock(str(root / f".{name}.lock"), timeout=900):
        if final.is_dir():
            return str(final)
        for stale in root.glob(f".build-{name}-{fp}-*"):  # left by a builder that crashed
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root / f".build-{name}-{fp}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            with _quiet_hf():
                build(name, str(tmp))
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return str(final)


class _quiet_hf:
    """Silence transformers/diffusers progress bars and info logs while building; restore after."""

    def __enter__(self):
        import diffusers
        import transformers

        self._libs = [lib.utils.logging for lib in (transformers, diffusers)]
        self._saved = [(lg.get_verbosity(), lg.is_progress_bar_enabled()) for lg in self._libs]
        for lg in self._libs:
            lg.set_verbosity_error()
            lg.disable_progress_bar()
        return self

    def __exit__(self, *exc):
        for lg, (verbosity, bars) in zip(self._libs, self._saved):
            lg.set_verbosity(verbosity)
            if bars:
                lg.enable_progress_bar()
        return False
