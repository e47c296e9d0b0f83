"""tokenizer.json for the exported text encoder: Hugging Face `tokenizers`, identical to training.

MiniLM (BERT family): the model's own tokenizer.json with the tower's truncation (max_seq_length)
and padding to the longest text of a batch, so the ONNX text encoder has a dynamic sequence axis.

open_clip: a byte-level BPE rebuilt from open_clip's bundled vocabulary (Radford et al. 2021,
`bpe_simple_vocab_16e6.txt.gz`). Normalizers redo open_clip's `_clean_lower`: the per-character
fixes of ftfy 6.3 taken from its own tables (C1 controls read as Windows-1252, control characters,
Latin ligatures, character width, curly quotes), NFC, HTML's legacy named and common numeric
entities unescaped twice, whitespace collapsed and stripped, lowercase with Python's final sigma.
Then open_clip's split regex, the `</w>` end-of-word suffix, SOT/EOT around the text, truncation to
the context length that keeps EOT last, and zero padding to the fixed context length.
Known gaps, caught by the export's parity check on the run's own texts: ftfy's mojibake repair
(e.g. "Ã©" -> "é"), other HTML entities ("&hellip;", "&#8217;"), a literal "<start_of_text>"
glued to punctuation, and Python's final-sigma rule after over eight case-ignorable characters.
"""
from __future__ import annotations

import gzip
import html
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers import processors

CLIP_SOT = "<start_of_text>"
CLIP_EOT = "<end_of_text>"
CLIP_PAD_ID = 0
CLIP_SPLIT = (r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]"
              r"|[^\s\p{L}\p{N}]+")
_CASED = r"[\p{Lu}\p{Ll}\p{Lt}]"
_CASE_IGNORABLE = (r"[\p{Mn}\p{Me}\p{Cf}\p{Lm}\p{Sk}'.:\x{b7}\x{387}\x{5f4}\x{2018}\x{2019}"
                   r"\x{2024}\x{2027}\x{fe13}\x{fe52}\x{fe55}\x{ff07}\x{ff0e}\x{ff1a}]")
_MAX_IGNORABLE = 8  # look-behind must be of bounded length
_BEFORE_SIGMA = "|".join(f"{_CASED}{_CASE_IGNORABLE}{{{k}}}" for k in range(_MAX_IGNORABLE + 1))
FINAL_SIGMA = f"(?<={_BEFORE_SIGMA})Σ(?!{_CASE_IGNORABLE}*{_CASED})"  # str.lower()'s rule
NUMERIC_ENTITIES = ("&#39;", "&#x27;", "&#34;", "&#38;", "&#60;", "&#62;", "&#160;", "&apos;")
BERT_INPUTS = ["input_ids", "attention_mask"]
CLIP_INPUTS = ["input_ids"]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the ByteLevel alphabet)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def default_bpe_path() -> Path:
    """open_clip's bundled BPE merges file."""
    import open_clip.tokenizer

    return Path(open_clip.tokenizer.default_bpe())


def clip_vocab(bpe_path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges exactly as open_clip's SimpleTokenizer builds them."""
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    alphabet = list(bytes_to_unicode().values())
    vocab = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    vocab += [CLIP_SOT, CLIP_EOT]
    return {token: i for i, token in enumerate(vocab)}, merges


def _char_map_normalizers() -> list[normalizers.Normalizer]:
    """ftfy's per-character fixes (its own tables), as literal Replace normalizers."""
    from ftfy import chardata
    from ftfy.fixes import fix_c1_controls

    c1 = [(chr(c), fix_c1_controls(chr(c))) for c in range(0x80, 0xA0)]
    out = [normalizers.Replace(c, fixed) for c, fixed in c1 if fixed != c]
    out += [normalizers.Replace(Regex("[" + "".join(
        f"\\x{{{c:x}}}" for c in sorted(chardata.CONTROL_CHARS)) + "]"), "")]
    for table in (chardata.LIGATURES, chardata.WIDTH_MAP):
        out += [normalizers.Replace(chr(c), s) for c, s in sorted(table.items()) if chr(c) != s]
    out.append(normalizers.Replace(Regex(chardata.SINGLE_QUOTE_RE.pattern), "'"))
    out.append(normalizers.Replace(Regex(chardata.DOUBLE_QUOTE_RE.pattern), '"'))
    return out


def unescape_normalizers() -> list[normalizers.Normalizer]:
    """One html.unescape pass: legacy named entities with ";" (and without, unless followed by
    ";"), plus common numeric ones; longest names first."""
    from html.entities import html5

    legacy = sorted((n for n in html5 if not n.endswith(";")), key=lambda n: (-len(n), n))
    exact = [f"&{n};" for n in legacy] + list(NUMERIC_ENTITIES)
    out = [normalizers.Replace(e, html.unescape(e)) for e in sorted(exact, key=lambda e: -len(e))]
    return out + [normalizers.Replace(Regex(f"&{n}(?!;)"), html5[n]) for n in legacy]


def clip_normalizer() -> normalizers.Normalizer:
    """open_clip's `_clean_lower`: ftfy fixes, NFC, html unescape twice, whitespace, lowercase."""
    unescape = unescape_normalizers()
    return normalizers.Sequence([
        *_char_map_normalizers(), normalizers.NFC(), *unescape, *unescape,
        normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip(),
        normalizers.Replace(Regex(FINAL_SIGMA), "ς"), normalizers.Lowercase()])


def clip_tokenizer(context_length: int, bpe_path: Path | None = None) -> Tokenizer:
    """A `tokenizers` equivalent of open_clip's SimpleTokenizer(clean="lower")."""
    vocab, merges = clip_vocab(bpe_path or default_bpe_path())
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>",
                               fuse_unk=False))
    tok.normalizer = clip_normalizer()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=True)
                            for t in (CLIP_SOT, CLIP_EOT)])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{CLIP_SOT} $A {CLIP_EOT}",
        special_tokens=[(CLIP_SOT, vocab[CLIP_SOT]), (CLIP_EOT, vocab[CLIP_EOT])])
    tok.decoder = decoders.BPEDecoder(suffix="</w>")
    tok.enable_truncation(max_length=context_length)
    tok.enable_padding(length=context_length, pad_id=CLIP_PAD_ID, pad_token="!")
    return tok


def bert_tokenizer(tokenizer: Tokenizer) -> Tokenizer:
    """An independent copy of a BERT tower's tokenizer (truncation and padding included)."""
    return Tokenizer.from_str(tokenizer.to_str())


def encode_texts(tokenizer: Tokenizer, texts: list[str | None],
                 input_names: list[str]) -> dict[str, np.ndarray]:
    """The serving path: texts (None = "") -> int64 (B, L) arrays named as the ONNX inputs."""
    enc = tokenizer.encode_batch(["" if t is None else str(t) for t in texts])
    fields = {"input_ids": lambda e: e.ids, "attention_mask": lambda e: e.attention_mask,
              "token_type_ids": lambda e: e.type_ids}
    return {name: np.asarray([fields[name](e) for e in enc], dtype=np.int64)
            for name in input_names}


PARITY_TEXTS = [
    "", "   ", "A red cotton T-shirt, size M.", "Don't you're we've I'm they'll he'd it's",
    "DON'T SHOUT", "\u201ccurly\u201d \u2018quotes\u2019", "\ufb01ne \ufb02our",
    "\uff2c\uff2f\uff35\uff24", "AT&amp;T &lt;b&gt; &quot;x&quot; &amp;amp;",
    "caf\u00e9 \u00fcn\u00efc\u00f6de \u2713 \U0001f600", "\u4e2d\u6587 \u65e5\u672c\u8a9e",
    "\u0395\u039b\u039b\u0397\u039d\u0399\u039a\u0391 \u03a3\u039f\u03a6\u039f\u03a3",
    "tab\tsep\x0bvt\x1cfs\r\nline", "price: $9.99 (50% off!) C++ & C#",
    "e\u0301 \u0130stanbul stra\u00dfe", "word " * 300, "x" * 500,
]


def tower_kind(tower: object) -> str:
    """'bert' for sentence towers, 'clip' for open_clip text towers."""
    from train.encoders.minilm import MiniLMTower
    from train.encoders.openclip import OpenClipTextTower
    from train.perpeft import GroupedTower

    if isinstance(tower, GroupedTower):  # PerPEFT: every group tokenises as its first member
        tower = tower.base
    if isinstance(tower, MiniLMTower):
        return "bert"
    if isinstance(tower, OpenClipTextTower):
        return "clip"
    raise ValueError(f"no tokenizer export for {type(tower).__name__}")


def tokenizer_for(tower: object) -> tuple[Tokenizer, str, list[str]]:
    """(tokenizer, kind, ONNX input names) reproducing a text tower's own tokenisation."""
    kind = tower_kind(tower)
    if kind == "bert":
        return bert_tokenizer(tower.tokenizer), kind, list(BERT_INPUTS)
    tokenizer = getattr(tower.tokenizer, "tokenizer", tower.tokenizer)
    if type(tokenizer).__name__ != "SimpleTokenizer" or getattr(tokenizer, "reduction_fn", None):
        raise ValueError(f"open_clip tokenizer {type(tokenizer).__name__} has no tokenizers "
                         "equivalent here (only SimpleTokenizer with truncation)")
    if tokenizer.clean_fn.__name__ != "_clean_lower" or len(tokenizer.encoder) != 49408:
        raise ValueError("only open_clip's default SimpleTokenizer (clean='lower', 49408 tokens) "
                         "is supported")
    return clip_tokenizer(tower.context_length), kind, list(CLIP_INPUTS)


def _training_ids(tower: object, texts: list[str], names: list[str]) -> dict[str, np.ndarray]:
    """Token arrays exactly as the tower prepares them for training."""
    prepared, _ = tower.prepare_counted(texts)
    if not isinstance(prepared, dict):
        prepared = {"input_ids": prepared}
    return {n: prepared[n].numpy() for n in names}


def mismatches(tower: object, tokenizer: Tokenizer, names: list[str], texts: list[str],
               batch: int = 256) -> list[str]:
    """Texts whose tokenizers encoding differs from the tower's (same batches, same padding)."""
    bad = []
    for start in range(0, len(texts), batch):
        chunk = texts[start:start + batch]
        ours, theirs = encode_texts(tokenizer, chunk, names), _training_ids(tower, chunk, names)
        differs = np.zeros(len(chunk), dtype=bool)
        for name in names:
            if ours[name].shape != theirs[name].shape:
                differs[:] = True
                break
            differs |= (ours[name] != theirs[name]).any(axis=1)
        bad += [chunk[i] for i in np.flatnonzero(differs)]
    return bad
