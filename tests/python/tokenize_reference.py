"""Reference token ids from Hugging Face `tokenizers` (Python; its pre-tokenizer regex runs on
Oniguruma) for many generated strings, so that flashmoe's tokenizer (built with the pure-Rust
fancy-regex engine, which also builds for macOS) can be compared with it id for id.

usage: tokenize_reference.py TOKENIZER_JSON[.gz] OUT_JSON [COUNT]
"""
import gzip
import json
import random
import sys

from tokenizers import Tokenizer

# Pieces chosen to stress the pre-tokenizer pattern: contractions, letter/number/punctuation
# runs, every kind of whitespace (the `\s+(?!\S)` look-ahead), scripts without spaces,
# combining marks, emoji sequences, control characters and special-token look-alikes.
PIECES = [
    "Hello", "world", " ", "  ", "   ", "\t", "\n", "\r\n", "\n\n", " \n ", "\u00a0", "\u3000",
    "\u2028", "'s", "'S", "'t", "'re", "'ll", "'D", "n't", "I'm", "DON'T", "1", "12", "123", "1234",
    "3.14", "-42", "1e9", "0x1F", "，", "。", "！", "?!", "...", "--", "()", "{}", "[]", "<>",
    "==", "=>", "->", "::", "/**/", "#", "@", "$", "%", "^", "&", "*", "_", "~", "`", "|",
    "\\", '"', "'", "毕老师", "中文", "日本語", "カタカナ", "ひらがな", "한국어", "مرحبا",
    "नमस्ते", "Привет", "ÄÖÜß", "café", "e\u0301", "A\u030a", "👍🏽", "👨\u200d👩\u200d👧",
    "🇫🇷", "❤️", "\u200b", "\x00", "\x7f", "\x1b[0m", "ĠÑĤ", "<|im_start|>", "<|im_end|>",
    "<think>", "</think>", "<tool_call>", "<|endoftext|>", "<|im_sta", "fn", "def", "SELECT",
    "https://x.org/a?b=c", "a" * 40, "    return", "x_y", "camelCase", "UPPER", "mIxEd",
]


def sample(rng):
    n = rng.randint(1, 12)
    return "".join(rng.choice(PIECES) for _ in range(n))


def main():
    tok_path, out_path = sys.argv[1], sys.argv[2]
    count = int(sys.argv[3]) if len(sys.argv) > 3 else 3000
    if tok_path.endswith(".gz"):
        with gzip.open(tok_path, "rt", encoding="utf-8") as f:
            tok = Tokenizer.from_str(f.read())
    else:
        tok = Tokenizer.from_file(tok_path)
    rng = random.Random(20261207)
    texts = [sample(rng) for _ in range(count)]
    cases = [{"text": t, "ids": tok.encode(t, add_special_tokens=False).ids} for t in texts]
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(cases, f, ensure_ascii=False)


if __name__ == "__main__":
    main()
