"""A tiny random-weight qwen2_vl vision model, built on disk for tests (offline, fast).

``build_tiny_qwen2_vl(path)`` writes a model directory that ``mlx_vlm.load`` accepts:

- ``config.json``: a qwen2_vl with a 2-layer text model (hidden 64, 4 heads of 16, so the
  ``mrope_section`` [2, 3, 3] sums to half the head size) and a 1-block vision tower
  (embed 32, ``mlp_ratio`` 2: an int, as mlx-vlm needs), patch 14, merge 2.
- ``model.safetensors``: a randomly initialised ``mlx_vlm.models.qwen2_vl.Model``
  (``mx.random.seed(seed)``), with the text part tamed like tinymodel's llama.
- ``tokenizer.json`` / ``tokenizer_config.json`` / ``chat_template.json``: tinymodel's
  byte-level BPE plus ``<|vision_start|>``, ``<|vision_end|>``, ``<|image_pad|>``,
  ``<|video_pad|>`` and a Qwen2-VL style ChatML template that renders image parts.
- ``preprocessor_config.json``: min/max pixels of 4 and 16 merged patches (28 x 28 pixels
  each), so every image becomes 4..16 image tokens: fast on a CPU.

The image tokens of one image are ``IMAGE_TOKENS_MIN``..``IMAGE_TOKENS_MAX`` plus the two
vision markers; tests compare prompt token counts rather than hard-coding them.
"""

from __future__ import annotations

import json
from pathlib import Path

from tinymodel import EOS_TOKEN, _build_tokenizer, _tame, _token_classes

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
PATCH = 14
MERGE = 2
UNIT = PATCH * MERGE  # one image token per UNIT x UNIT pixels
IMAGE_TOKENS_MIN = 4
IMAGE_TOKENS_MAX = 16

# Qwen2-VL's template, shortened: content may be a string or a list of text / image parts.
QWEN2_VL_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def build_tiny_qwen2_vl(path: Path, *, seed: int = 0, layers: int = 2, hidden: int = 64,
                        max_position_embeddings: int = 4096) -> Path:
    """Write the model directory at ``path`` and return ``path``.

    Side effect: calls ``mx.random.seed(seed)``, i.e. resets MLX's global RNG.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_vlm.models import qwen2_vl
    from tokenizers import AddedToken

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = _build_tokenizer()
    base_vocab = tok.get_vocab_size(with_added_tokens=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in VISION_TOKENS])
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    tok.save(str(path / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in VISION_TOKENS}
    heads = 4
    head_dim = hidden // heads
    config = {
        "model_type": "qwen2_vl",
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": 2 * hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": 2,
        "vocab_size": vocab_size,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": _mrope_section(head_dim)},
        "max_position_embeddings": max_position_embeddings,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "bos_token_id": None,
        "eos_token_id": tok.token_to_id(EOS_TOKEN),
        "pad_token_id": tok.token_to_id("<|endoftext|>"),
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "torch_dtype": "float32",
        "vision_config": {
            "model_type": "qwen2_vl",
            "depth": 1,
            "embed_dim": 32,
            "hidden_size": hidden,
            "num_heads": 2,
            "mlp_ratio": 2,
            "in_channels": 3,
            "patch_size": PATCH,
            "spatial_patch_size": PATCH,
            "spatial_merge_size": MERGE,
            "temporal_patch_size": 2,
        },
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))

    model_config = qwen2_vl.ModelConfig.from_dict(json.loads(json.dumps(config)))
    model_config.text_config = qwen2_vl.TextConfig.from_dict(model_config.text_config)
    model_config.vision_config = qwen2_vl.VisionConfig.from_dict(model_config.vision_config)
    mx.random.seed(seed)
    model = qwen2_vl.Model(model_config)
    weights = dict(tree_flatten(model.parameters()))
    weights = _tame_text(weights, tok, base_vocab, layers)
    mx.eval(weights)
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})

    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": max_position_embeddings,
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
        "chat_template": QWEN2_VL_TEMPLATE,
    }, indent=2))
    (path / "chat_template.json").write_text(json.dumps({"chat_template": QWEN2_VL_TEMPLATE}))
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor",
        "patch_size": PATCH,
        "temporal_patch_size": 2,
        "merge_size": MERGE,
        "min_pixels": IMAGE_TOKENS_MIN * UNIT * UNIT,
        "max_pixels": IMAGE_TOKENS_MAX * UNIT * UNIT,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_rescale": True,
        "do_normalize": True,
        "do_convert_rgb": True,
    }, indent=2))
    return path


def _mrope_section(head_dim: int) -> list[int]:
    """Three sections (temporal, height, width) summing to head_dim / 2."""
    half = head_dim // 2
    first = half - 2 * (half // 3)
    return [first, half // 3, half // 3]


def _tame_text(weights: dict, tok, base_vocab: int, layers: int) -> dict:
    """tinymodel's `_tame` on the language model's weights (keys renamed both ways), so
    the random model writes visible text and reliably runs to max_tokens."""
    prefix = "language_model."
    text = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    text = _tame(text, *_token_classes(tok, base_vocab), layers)
    weights.update({prefix + k: v for k, v in text.items()})
    return weights


def make_pdf(pages: int, *, width: float = 612, height: float = 792, lines: int = 3,
             user_password: bool = False) -> bytes:
    """A PDF of `pages` pages with a few lines of Helvetica text each, written by hand
    (no PDF library writes encryption here). ``user_password=True`` adds a standard security
    handler whose user password is not empty: readers cannot open it without the password."""
    objects: list[bytes] = []  # object i + 1

    def add(body: bytes) -> int:
        objects.append(body)
        return len(objects)

    font = add(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    pages_id = len(objects) + 1 + 2 * pages  # allocated after the pages and their contents
    kids = []
    for p in range(pages):
        text = b"".join(
            b"BT /F1 14 Tf 72 %d Td (Page %d, line %d: the quick brown fox jumps.) Tj ET\n"
            % (int(height) - 72 - 20 * n, p + 1, n + 1) for n in range(lines))
        content = add(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(text), text))
        kids.append(add(b"<< /Type /Page /Parent %d 0 R /MediaBox [0 0 %g %g] /Contents %d 0 R "
                        b"/Resources << /Font << /F1 %d 0 R >> >> >>"
                        % (pages_id, width, height, content, font)))
    assert add(b"<< /Type /Pages /Kids [%s] /Count %d >>" % (
        b" ".join(b"%d 0 R" % k for k in kids), pages)) == pages_id
    catalog = add(b"<< /Type /Catalog /Pages %d 0 R >>" % pages_id)
    encrypt = add(b"<< /Filter /Standard /V 1 /R 2 /Length 40 /P -44 /O <%s> /U <%s> >>"
                  % (b"ab" * 32, b"cd" * 32)) if user_password else None

    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for i, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (i, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % off for off in offsets)
    trailer = b"/Size %d /Root %d 0 R" % (len(objects) + 1, catalog)
    if encrypt:
        trailer += b" /Encrypt %d 0 R /ID [<%s> <%s>]" % (encrypt, b"01" * 16, b"01" * 16)
    out += b"trailer\n<< %s >>\nstartxref\n%d\n%%%%EOF\n" % (trailer, xref)
    return bytes(out)


def make_slow_pdf(depth: int, fan: int = 4) -> bytes:
    """A one-page PDF (a few KB, 200x200 pt) whose page draws a form XObject `fan` times, each
    drawing the next form `fan` times, `depth` levels down: fan**depth strokes to render
    (depth 16: hours in pdfium), yet every size and page limit lets it through."""
    objs = {1: b"<< /Type /Catalog /Pages 2 0 R >>",
            2: b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            3: b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] "
               b"/Resources << /XObject << /F 10 0 R >> >> /Contents 4 0 R >>"}
    draw = b"/F Do " * fan
    objs[4] = b"<< /Length %d >>\nstream\n%s\nendstream" % (len(draw), draw)
    for k in range(depth):
        last = k == depth - 1
        body = b"0 0 m 200 200 l S" if last else draw
        res = b"" if last else b"/Resources << /XObject << /F %d 0 R >> >>" % (11 + k)
        objs[10 + k] = (b"<< /Type /XObject /Subtype /Form /BBox [0 0 200 200] %s /Length %d "
                        b">>\nstream\n%s\nendstream" % (res, len(body), body))
    out = bytearray(b"%PDF-1.4\n")
    offsets = {}
    for n in sorted(objs):
        offsets[n] = len(out)
        out += b"%d 0 obj\n%s\nendobj\n" % (n, objs[n])
    size = max(objs) + 1
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % size
    out += b"".join(b"%010d 00000 n \n" % offsets[n] if n in offsets
                    else b"0000000000 65535 f \n" for n in range(1, size))
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (size, xref)
    return bytes(out)
