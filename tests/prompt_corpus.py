"""A deterministic corpus of prompts that stress CLIP text cleaning and BPE.

Built from fixed pieces and a seeded random generator, so every run sees the same texts: A1111 weight
syntax, CJK, emoji, HTML entities (nested too), curly quotes, full-width text, ligatures, mojibake that
ftfy repairs, control characters, numbers, odd whitespace, special-token strings, very long prompts.
"""

from __future__ import annotations

import random

WORDS = (
    "a photo of an astronaut riding a horse on mars masterpiece best quality ultra detailed 8k "
    "portrait girl boy castle forest sunset cinematic lighting sharp focus intricate artstation "
    "trending octane render volumetric fog highly detailed illustration watercolor oil painting "
    "lowres bad anatomy bad hands text error missing fingers cropped worst quality jpeg artifacts "
    "signature watermark username blurry EasyNegative bad-artist bad_prompt_version2 ng_deepnegative_v1_75t "
    "don't it's we're they've I'm you'll he'd CAPS MiXeD camelCase snake_case kebab-case"
).split()

UNICODE_PIECES = (
    "日本語のテキスト", "一个美丽的女孩", "한국어 문장", "Ελληνικά", "Русский текст", "العربية", "हिन्दी",
    "🎉", "🐱‍👤", "👩🏽‍🚀", "❤️", "🇯🇵", "★☆", "→", "∑∫√", "°C", "½ ¼", "№", "™", "©", "®",
    "café", "naïve", "Zoë", "façade", "e\u0301", "Å", "ß", "İstanbul", "ǅ", "ﬁne", "ﬂow", "ﬀ", "Ⅻ",
    "Ｆｕｌｌ－ｗｉｄｔｈ", "ＡＢＣ１２３", "（ｗｅｉｇｈｔ：１．２）", "“curly”", "‘single’", "„low“", "«guillemets»",
    "em—dash", "en–dash", "ellipsis…", "cafÃ©", "â€œmojibakeâ€\x9d", "Ã¼ber", "&amp;", "&amp;amp;",
    "&lt;tag&gt;", "&#39;", "&quot;q&quot;", "&nbsp;", "&#x1F600;", "&eacute;", "&copy;", "&#28;", "&bogus;",
    "tab\there", "new\nline", "cr\r\nlf", "nbsp\u00a0space", "ideo\u3000space", "zw\u200bsp", "\u2028ls",
    "ctrl\x07bell", "vt\x0bx", "ff\x0cx", "del\x7fx", "esc\x1b[31mred\x1b[0m", "nul\x00x", "\x1cfs",
    "<|startoftext|>", "<|endoftext|>", "<<|endoftext|>", "x<|endoftext|>y", "<|ENDOFTEXT|>",
    "3.14", "1e-5", "1234567890", "2,000", "v1.5", "512x512", "0.8", "-1", "#hashtag", "@mention",
    "http://example.com/a?b=c", "path/to/file.png", "C:\\Users\\x", "emoji🎉inword", "a'b'c", "''''",
)

WEIGHT_TEMPLATES = (
    "({})", "(({}))", "[{}]", "[[{}]]", "({}:1.2)", "({}:0.8)", "({}:1.5)", "[{}:{}:10]", "[{}:{}:0.5]",
    "[{}|{}]", "{} BREAK {}", "{} AND {}:0.5", "\\({}\\)", "({}", "{})", "<lora:{}:0.7>",
)


def generated_prompts(count: int = 600, seed: int = 1234) -> list[str]:
    """`count` deterministic prompts; every tenth is long (several hundred tokens)."""
    rng = random.Random(seed)
    prompts: list[str] = []
    for index in range(count):
        pieces: list[str] = []
        length = rng.randint(40, 120) if index % 10 == 9 else rng.randint(1, 14)
        for _ in range(length):
            roll = rng.random()
            if roll < 0.45:
                piece = rng.choice(WORDS)
            elif roll < 0.8:
                piece = rng.choice(UNICODE_PIECES)
            else:
                template = rng.choice(WEIGHT_TEMPLATES)
                piece = template.format(*(rng.choice(WORDS) for _ in range(template.count("{}"))))
            pieces.append(piece)
        separator = rng.choice((" ", ", ", ",", " ,  ", "\n", "  ", "", "\t"))
        prompts.append(separator.join(pieces))
    return prompts
