#!/usr/bin/env python3
"""Builds the calibration and evaluation text of benches/PERPLEXITY.md from English Wikipedia articles.

usage: wiki-text.py OUT_DIR     (python3 with pip; downloads the gensim 4.4.0 wheel, about 28 MB)

Writes OUT_DIR/wiki-calib.txt and OUT_DIR/wiki-eval.txt, and beside each a .titles file listing its
articles. The articles come from the excerpt of a Wikipedia dump that gensim ships as test data
(gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2). Markup is
stripped to plain paragraphs; articles alternate between the two files, so calibration and evaluation
never share text.

Licence of the text (not of this script): the articles are by Wikipedia contributors and are licensed
under the Creative Commons Attribution-ShareAlike licence (CC BY-SA,
https://creativecommons.org/licenses/by-sa/4.0/). The .titles files name every article used; each
article's authors are listed in its history, https://en.wikipedia.org/w/index.php?title=TITLE&action=history.
The text files are therefore not part of lamina's repository; this script recreates them.
"""
import bz2
import html
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile

GENSIM_WHEEL = "gensim==4.4.0"
DUMP = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def download_dump():
    """The dump excerpt, read from the gensim wheel (downloaded with pip, not installed)."""
    tmp = tempfile.mkdtemp()
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    GENSIM_WHEEL, "-d", tmp], check=True)
    wheel = next(f for f in os.listdir(tmp) if f.endswith(".whl"))
    return bz2.decompress(zipfile.ZipFile(os.path.join(tmp, wheel)).read(DUMP))


def strip_nested(text, open_, close):
    """Removes every (possibly nested) span from `open_` to its matching `close`."""
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith(open_, i):
            depth += 1
            i += len(open_)
        elif depth and text.startswith(close, i):
            depth -= 1
            i += len(close)
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


def paragraphs(wiki):
    """The prose paragraphs of an article's wiki markup: templates, tables, references, files,
    categories and markup removed; lists, headings and paragraphs under 200 characters dropped."""
    t = re.sub(r"<!--.*?-->", "", wiki, flags=re.S)
    t = re.sub(r"<ref[^>/]*/>", "", t)
    t = re.sub(r"<ref.*?</ref>", "", t, flags=re.S)
    t = strip_nested(t, "{{", "}}")
    t = strip_nested(t, "{|", "|}")
    t = re.sub(r"\[\[(?:File|Image|Category|[a-z\-]{2,12}):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", "", t)
    t = re.sub(r"\[\[([^\]|]*)\|([^\]]*)\]\]", r"\2", t)
    t = re.sub(r"\[\[([^\]]*)\]\]", r"\1", t)
    t = re.sub(r"\[https?://[^\s\]]+ ([^\]]*)\]", r"\1", t)
    t = re.sub(r"\[https?://[^\]]*\]", "", t)
    t = re.sub(r"'{2,}", "", t)
    t = re.sub(r"<[^>]+>", "", t)
    t = html.unescape(t)
    out = []
    for p in t.split("\n"):
        p = p.strip()
        if len(p) < 200 or p.startswith(("*", "#", ":", ";", "|", "!", "=")):
            continue
        out.append(re.sub(r"\s+", " ", p))
    return out


def articles(xml):
    """(title, paragraphs) of every article with more than 2,000 characters of prose, in dump order."""
    tag = lambda e: e.tag.split("}")[1]
    found = []
    for page in ET.fromstring(xml):
        if tag(page) != "page":
            continue
        title = next(c.text for c in page if tag(c) == "title")
        text = None
        for rev in page:
            if tag(rev) == "revision":
                for c in rev:
                    if tag(c) == "text":
                        text = c.text or ""
        if not text or text.lstrip().upper().startswith("#REDIRECT"):
            continue
        paras = paragraphs(text)
        if sum(len(p) for p in paras) > 2000:
            found.append((title, paras))
    return found


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    arts = articles(download_dump())
    split = {"calib": arts[0::2], "eval": arts[1::2]}
    for name, part in split.items():
        with open(os.path.join(out, f"wiki-{name}.txt"), "w") as f:
            for title, paras in part:
                f.write(f" = {title} = \n\n" + "\n\n".join(paras) + "\n\n")
        with open(os.path.join(out, f"wiki-{name}.titles"), "w") as f:
            f.write("\n".join(t for t, _ in part) + "\n")
        print(name, len(part), "articles", sum(sum(len(p) for p in ps) for _, ps in part), "chars")


if __name__ == "__main__":
    main()
