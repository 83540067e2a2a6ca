#!/usr/bin/env python3
"""Prepare training data and tokenizer for the bundled driftwood-mini model.

Runs on a developer machine (no GPU needed). Steps:

1. Fetch public-domain English text from Debian packages:
   * ``bible-kjv-text`` + ``bible-kjv``: the King James Bible (public domain),
     dumped with the ``bible`` program.
   * ``r-cran-janeaustenr``: Jane Austen's six completed novels (public domain
     texts, package MIT licensed). The novels are stored as R lazy-load data;
     a tiny R-serialization reader below extracts the character vectors, so
     R itself is not needed.
2. Clean the text and split it into documents (chapters).
3. Build a few ChatML-formatted "continue this passage" samples.
4. Train a byte-level BPE tokenizer (vocab 4096) with ``tokenizers``.
5. Write into ``.data/``:
   * ``tokenizer/`` (tokenizer.json + configs, copied later into the model dir)
   * ``train.bin`` / ``val.bin``: uint16 token ids, documents separated by
     ``<|endoftext|>``
   * ``corpus_stats.json``

Usage:  python3 scripts/train/prepare_data.py [--data-dir .data]
Needs:  apt-get (root), python packages ``tokenizers`` and ``numpy``.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 4096
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

AUSTEN_TITLES = {
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}


# ---------------------------------------------------------------------------
# Package fetching
# ---------------------------------------------------------------------------

def sh(cmd: list[str], **kw) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout


def pkg_version(name: str) -> str:
    out = sh(["apt-cache", "show", "--no-all-versions", name])
    for line in out.splitlines():
        if line.startswith("Version:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def ensure_debs(data_dir: Path) -> dict[str, str]:
    """Download and unpack the needed .deb files; install bible-kjv (the reader)."""
    debs = data_dir / "debs"
    root = data_dir / "pkgroot"
    debs.mkdir(parents=True, exist_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    if shutil.which("bible") is None:
        subprocess.run(["apt-get", "update", "-q"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-q", "bible-kjv", "bible-kjv-text"], check=True)
    versions = {}
    for pkg in ["bible-kjv-text", "bible-kjv", "r-cran-janeaustenr"]:
        versions[pkg] = pkg_version(pkg)
    if not list(debs.glob("r-cran-janeaustenr_*.deb")):
        subprocess.run(["apt-get", "download", "r-cran-janeaustenr"], check=True, cwd=debs)
    deb = sorted(debs.glob("r-cran-janeaustenr_*.deb"))[-1]
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return versions


# ---------------------------------------------------------------------------
# Minimal reader for R serialization (XDR, versions 2/3) - enough for the
# character vectors in an R package's lazy-load data base (Rdata.rdb/.rdx).
# ---------------------------------------------------------------------------

class RList(list):
    """An R vector with its attributes (e.g. names)."""
    attrs: dict = {}


class RReader:
    def __init__(self, buf: bytes):
        self.b = buf
        self.p = 0
        self.refs: list = []

    def int(self) -> int:
        v = struct.unpack_from(">i", self.b, self.p)[0]
        self.p += 4
        return v

    def length(self) -> int:
        n = self.int()
        if n == -1:
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        return n

    def header(self):
        fmt = self.b[self.p:self.p + 2]
        if fmt != b"X\n":
            raise ValueError(f"unsupported R serialization format {fmt!r}")
        self.p += 2
        version = self.int()
        self.int()  # writer version
        self.int()  # min reader version
        if version == 3:
            n = self.int()
            self.p += n  # native encoding

    def string_vec(self):
        self.int()  # 0
        n = self.int()
        return [self.item() for _ in range(n)]

    def item(self):
        flags = self.int()
        t = flags & 0xFF
        has_attr = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))
        if t == 254 or t in (253, 252, 251, 250, 242, 241):  # NILVALUE, envs, markers
            return None
        if t == 255:  # REFSXP
            idx = flags >> 8
            if idx == 0:
                idx = self.int()
            return self.refs[idx - 1]
        if t in (249, 248, 247):  # NAMESPACE / PACKAGE / PERSIST
            v = ("persist", self.string_vec())
            self.refs.append(v)
            return v
        if t == 1:  # SYMSXP
            self.refs.append(None)
            i = len(self.refs) - 1
            name = self.item()
            self.refs[i] = ("sym", name)
            return self.refs[i]
        if t in (2, 6, 3, 5, 17, 240, 239):  # pairlist-like
            attr = self.item() if has_attr else None
            tag = self.item() if has_tag else None
            car = self.item()
            cdr = self.item()
            out = [(tag[1] if isinstance(tag, tuple) else tag, car)]
            if isinstance(cdr, list):
                out += cdr
            return out
        if t == 4:  # ENVSXP
            self.int()
            env = {}
            self.refs.append(env)
            self.item(); self.item(); self.item(); self.item()
            return env
        if t == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None
            s = self.b[self.p:self.p + n].decode("utf-8", errors="replace")
            self.p += n
            return s
        if t in (10, 13):  # LGLSXP, INTSXP
            n = self.length()
            v = list(struct.unpack_from(f">{n}i", self.b, self.p))
            self.p += 4 * n
        elif t == 14:  # REALSXP
            n = self.length()
            v = list(struct.unpack_from(f">{n}d", self.b, self.p))
            self.p += 8 * n
        elif t == 15:  # CPLXSXP
            n = self.length()
            self.p += 16 * n
            v = None
        elif t == 16:  # STRSXP
            n = self.length()
            v = [self.item() for _ in range(n)]
        elif t in (19, 20):  # VECSXP, EXPRSXP
            n = self.length()
            v = [self.item() for _ in range(n)]
        elif t == 24:  # RAWSXP
            n = self.length()
            v = self.b[self.p:self.p + n]
            self.p += n
        elif t == 238:  # ALTREP
            info = self.item()
            state = self.item()
            self.item()  # attr
            return state
        else:
            raise ValueError(f"unsupported SEXP type {t}")
        if has_attr:
            attrs = self.item()
            if isinstance(v, list):
                v = RList(v)
                v.attrs = {k: val for k, val in (attrs or [])}
        return v


def r_unserialize(buf: bytes):
    r = RReader(buf)
    r.header()
    return r.item()


def read_r_lazyload(prefix: Path) -> dict[str, object]:
    """Read all objects from <prefix>.rdx / <prefix>.rdb (an R lazy-load DB)."""
    index = r_unserialize(gzip.decompress(prefix.with_suffix(".rdx").read_bytes()))
    names = dict(zip(index.attrs["names"], index))
    variables = names["variables"]
    rdb = prefix.with_suffix(".rdb").read_bytes()
    out = {}
    for name, (off, ln) in zip(variables.attrs["names"], variables):
        chunk = rdb[off:off + ln]
        out[name] = r_unserialize(zlib.decompress(chunk[4:]))
    return out


# ---------------------------------------------------------------------------
# Text extraction and cleaning
# ---------------------------------------------------------------------------

def norm(s: str) -> str:
    s = s.replace("\u2019", "'").replace("\u2018", "'")
    s = s.replace("\u201c", '"').replace("\u201d", '"')
    s = s.replace("\u2014", "--").replace("\u2013", "-")
    s = s.replace("_", "")  # Gutenberg italics markers
    s = re.sub(r"[ \t]+", " ", s)
    return s.strip()


def bible_documents() -> list[str]:
    raw = subprocess.run(["bible", "-l200", "gen1:1-rev22:21"], check=True,
                         capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"}).stdout
    docs, cur, verse = [], [], []
    heading = None

    def flush_verse():
        if verse:
            cur.append(norm(" ".join(verse)))
            verse.clear()

    def flush_doc():
        flush_verse()
        if cur:
            docs.append((heading + "\n\n" if heading else "") + "\n".join(cur))
            cur.clear()

    for line in raw.splitlines():
        if not line.strip():
            continue
        m = re.match(r"^\s+(\d+)\s+(.*)$", line)
        if m:
            flush_verse()
            verse.append(m.group(2))
        elif re.match(r"^[1-3]?\s?[A-Z][A-Za-z ]+ \d+$", line.strip()) and not line.startswith(" "):
            flush_doc()
            heading = line.strip()
        else:
            verse.append(line.strip())
    flush_doc()
    return docs


def austen_documents(pkgroot: Path) -> list[str]:
    prefix = pkgroot / "usr/lib/R/site-library/janeaustenr/data/Rdata"
    objs = read_r_lazyload(prefix)
    docs = []
    for key, title in AUSTEN_TITLES.items():
        lines = objs[key]
        paras, cur = [], []
        for ln in lines:
            ln = (ln or "").strip()
            if not ln:
                if cur:
                    paras.append(norm(" ".join(cur)))
                    cur = []
            else:
                cur.append(ln)
        if cur:
            paras.append(norm(" ".join(cur)))
        # split into chapters
        chapter: list[str] = []
        for p in paras:
            if re.match(r"^(CHAPTER|Chapter) [0-9IVXLC]+\.?$", p) or re.match(r"^VOLUME [IVX]+$", p):
                if len(chapter) > 3:
                    docs.append("\n\n".join(chapter))
                chapter = [p] if p.upper().startswith("CHAPTER") else []
                continue
            chapter.append(p)
        if len(chapter) > 3:
            docs.append("\n\n".join(chapter))
    return docs


def chat_samples(docs: list[str], n: int, rng: random.Random) -> list[str]:
    """ChatML 'continue this passage' pairs built from the plain text."""
    prompts = [
        "Continue this passage:\n\n{a}",
        "Please continue the story:\n\n{a}",
        "What comes next?\n\n{a}",
        "Continue the text.\n\n{a}",
        "{a}",
    ]
    systems = [None, None, "You are a helpful assistant that writes in a classic English style."]
    out = []
    for _ in range(n):
        d = rng.choice(docs)
        sents = re.split(r"(?<=[.!?;:])\s+", d.replace("\n", " "))
        sents = [s for s in sents if s]
        if len(sents) < 4:
            continue
        i = rng.randrange(0, len(sents) - 3)
        k = rng.randint(1, 3)
        m = rng.randint(1, 4)
        a = " ".join(sents[i:i + k])
        b = " ".join(sents[i + k:i + k + m])
        sysmsg = rng.choice(systems)
        s = ""
        if sysmsg:
            s += f"<|im_start|>system\n{sysmsg}<|im_end|>\n"
        s += f"<|im_start|>user\n{rng.choice(prompts).format(a=a)}<|im_end|>\n"
        s += f"<|im_start|>assistant\n{b}<|im_end|>\n"
        out.append(s)
    return out


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------

def train_tokenizer(texts: list[str], out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))

    special = {
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
    }
    added = {}
    for t in SPECIAL_TOKENS:
        added[str(tok.token_to_id(t))] = {
            "content": t, "lstrip": False, "normalized": False,
            "rstrip": False, "single_word": False, "special": True,
        }
    cfg = {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1024,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return tok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default=".data")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--chat-samples", type=int, default=6000)
    args = ap.parse_args()
    data_dir = Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)

    versions = ensure_debs(data_dir)
    bible = bible_documents()
    austen = austen_documents(data_dir / "pkgroot")
    print(f"bible: {len(bible)} chapters, {sum(map(len, bible))/1e6:.2f} MB")
    print(f"austen: {len(austen)} chapters, {sum(map(len, austen))/1e6:.2f} MB")
    if len(austen) < 200 or len(bible) < 1000:
        sys.exit("extraction looks wrong")

    # Hold out ~2% of chapters for validation (kept out of train and chat samples).
    uniq = bible + austen
    order = list(range(len(uniq)))
    rng.shuffle(order)
    val_ids = set(order[: max(40, len(uniq) // 50)])
    val_docs = [uniq[i] for i in sorted(val_ids)]
    bible_tr = [d for i, d in enumerate(bible) if i not in val_ids]
    austen_tr = [d for i, d in enumerate(austen) if i + len(bible) not in val_ids]

    chats = chat_samples(bible_tr + austen_tr, args.chat_samples, rng)
    # Austen is the more story-like prose: include it twice relative to the Bible.
    train_docs = bible_tr + austen_tr + austen_tr + chats
    rng.shuffle(train_docs)

    (data_dir / "corpus_sample.txt").write_text("\n\n<|endoftext|>\n\n".join(train_docs[:30]))
    tok = train_tokenizer(bible_tr + austen_tr + chats, data_dir / "tokenizer")
    eot = tok.token_to_id("<|endoftext|>")
    assert eot == 0, eot

    def encode(ds):
        ids = []
        for enc in tok.encode_batch(ds):
            ids.append(eot)
            ids.extend(enc.ids)
        ids.append(eot)
        return np.array(ids, dtype=np.uint16)

    tr, va = encode(train_docs), encode(val_docs)
    tr.tofile(data_dir / "train.bin")
    va.tofile(data_dir / "val.bin")
    stats = {
        "packages": versions,
        "bible_chapters": len(bible),
        "austen_chapters": len(austen),
        "chat_samples": len(chats),
        "train_tokens": int(tr.size),
        "val_tokens": int(va.size),
        "train_bytes": sum(len(d.encode()) for d in train_docs),
        "vocab_size": tok.get_vocab_size(),
    }
    (data_dir / "corpus_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
